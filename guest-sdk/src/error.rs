//! The error type of host calls that can fail.

/// Why a call to the host failed: an input past a bound (a state over
/// 2048 bytes, a value over 128 KiB), a storage failure, or a value that
/// could not be converted to or from JSON. The message names the value and
/// the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
}

impl Error {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Error { message: message.into() }
    }

    /// The message the host or the JSON conversion returned.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error::new(message)
    }
}

impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Self {
        Error::new(format!("invalid JSON: {err}"))
    }
}
