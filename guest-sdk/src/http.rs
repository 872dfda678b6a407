//! Accessors and constructors for [`Request`], [`Response`] and
//! [`Admission`].

use crate::{Admission, Request, Response};

impl Request {
    /// Returns the first value of a header. Names match case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// Returns the URL's path, without the query string.
    pub fn path(&self) -> &str {
        self.url.split_once('?').map_or(&self.url, |(path, _)| path)
    }

    /// Returns the first value of a query parameter, still percent-encoded.
    pub fn query(&self, name: &str) -> Option<&str> {
        let (_, query) = self.url.split_once('?')?;
        query
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value)
    }

    /// Returns the body as text, or `None` when it is not valid UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.body).ok()
    }

    /// Parses the body as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

impl Response {
    /// Creates a response with a status and an empty body.
    pub fn new(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Creates a `text/plain` response.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Response::new(status)
            .with_header("content-type", "text/plain; charset=utf-8")
            .with_body(body.into().into_bytes())
    }

    /// Creates an `application/json` response from a serialisable value.
    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        let body = serde_json::to_vec(value).expect("JSON serialisation of a value");
        Response::new(status)
            .with_header("content-type", "application/json")
            .with_body(body)
    }

    /// Sets a header, replacing any header of the same name (names match
    /// case-insensitively).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.retain(|(existing, _)| !existing.eq_ignore_ascii_case(name));
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Adds a header, keeping those of the same name, as `set-cookie` needs.
    pub fn append_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Replaces the body.
    pub fn with_body(mut self, body: Vec<u8>) -> Self {
        self.body = body;
        self
    }
}

impl Admission {
    /// Lets the request through unchanged.
    pub fn allow() -> Self {
        Admission::Allow(Vec::new())
    }

    /// Lets the request through with these headers added. Each replaces
    /// every header of the same name the client sent.
    pub fn allow_with_headers<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let headers = headers
            .into_iter()
            .map(|(name, value)| (name.to_ascii_lowercase(), value.to_string()))
            .collect();
        Admission::Allow(headers)
    }

    /// Answers the request with `response` instead.
    pub fn reject(response: Response) -> Self {
        Admission::Reject(response)
    }
}
