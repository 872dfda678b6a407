//! The environment of rooms: variables that `--var KEY=VALUE` and
//! `--env-file PATH` set, which a guest reads with `env`.
//!
//! Values are often secrets (API keys, signing keys), so they never reach a
//! log: [`Var`] and [`Environment`] print keys only in `Debug`, and nothing
//! else in the host formats a value. Every room of the process sees the
//! same variables. A `--var` overrides a key that the env file also sets.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use anyhow::Context;

/// Maximum variable name length, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// Maximum env file size, in bytes.
pub const MAX_ENV_FILE_BYTES: u64 = 1 << 20;

/// One `KEY=VALUE` variable.
#[derive(Clone, PartialEq, Eq)]
pub struct Var {
    pub key: String,
    pub value: String,
}

impl std::fmt::Debug for Var {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Var({}=<redacted>)", self.key)
    }
}

impl FromStr for Var {
    type Err = String;

    /// Parses `KEY=VALUE`. The value may contain `=` and may be empty.
    fn from_str(text: &str) -> Result<Var, String> {
        let Some((key, value)) = text.split_once('=') else {
            // The text may be a secret pasted without its key, so it is not
            // repeated in the error.
            return Err("expected KEY=VALUE, as in `--var API_KEY=abc`, but there is no `=`".into());
        };
        check_key(key)?;
        Ok(Var {
            key: key.to_string(),
            value: value.to_string(),
        })
    }
}

fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(format!("variable name must be 1 to {MAX_KEY_BYTES} bytes long, not {}", key.len()));
    }
    if let Some(bad) = key.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_')) {
        return Err(format!(
            "variable name `{}` is invalid: `{}` is not allowed; use letters, digits and `_`",
            key.escape_default(),
            bad.escape_default()
        ));
    }
    Ok(())
}

/// The variables every room can read.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Environment {
    vars: HashMap<String, String>,
}

impl std::fmt::Debug for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<&str> = self.vars.keys().map(String::as_str).collect();
        keys.sort_unstable();
        f.debug_struct("Environment").field("keys", &keys).finish()
    }
}

impl Environment {
    /// Builds the environment from an optional env file, then `vars` on top.
    pub fn load(env_file: Option<&Path>, vars: &[String]) -> anyhow::Result<Environment> {
        let mut environment = Environment::default();
        if let Some(path) = env_file {
            let size = std::fs::metadata(path)
                .with_context(|| format!("failed to read env file `{}` (--env-file)", path.display()))?
                .len();
            if size > MAX_ENV_FILE_BYTES {
                anyhow::bail!(
                    "env file `{}` is {size} bytes: the limit is {MAX_ENV_FILE_BYTES}",
                    path.display()
                );
            }
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("failed to read env file `{}` (--env-file)", path.display()))?;
            environment
                .parse_file(&text)
                .with_context(|| format!("env file `{}` is invalid", path.display()))?;
        }
        for text in vars {
            let var: Var = text.parse().map_err(|err| anyhow::anyhow!("--var is invalid: {err}"))?;
            environment.vars.insert(var.key, var.value);
        }
        Ok(environment)
    }

    /// Reads dotenv lines: `KEY=VALUE`, optionally after `export `, with
    /// the value optionally in single or double quotes. Blank lines and
    /// lines starting with `#` are skipped, and so is a ` #` comment after
    /// an unquoted value or after the closing quote.
    fn parse_file(&mut self, text: &str) -> anyhow::Result<()> {
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            let var: Var = line.parse().map_err(|err| anyhow::anyhow!("line {}: {err}", index + 1))?;
            let value = dotenv_value(var.value.trim());
            self.vars.insert(var.key.trim().to_string(), value.to_string());
        }
        Ok(())
    }

    /// Returns the value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    /// Number of variables.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }
}

/// Returns the value of a dotenv line: the text inside quotes when it
/// starts with one, else the text before a ` #` comment.
fn dotenv_value(value: &str) -> &str {
    for quote in ['"', '\''] {
        if let Some(rest) = value.strip_prefix(quote) {
            if let Some(end) = rest.find(quote) {
                let after = rest[end + 1..].trim_start();
                if after.is_empty() || after.starts_with('#') {
                    return &rest[..end];
                }
            }
        }
    }
    match value.find(" #") {
        Some(comment) => value[..comment].trim_end(),
        None => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotenv_value_strips_quotes_and_comments() {
        assert_eq!(dotenv_value("abc # comment"), "abc");
        assert_eq!(dotenv_value("a#b"), "a#b", "a `#` inside a word is part of the value");
        assert_eq!(dotenv_value("\"a b#c\" # comment"), "a b#c");
        assert_eq!(dotenv_value("'single'"), "single");
        assert_eq!(dotenv_value("\"unclosed"), "\"unclosed");
        assert_eq!(dotenv_value(""), "");
    }

    #[test]
    fn env_var_parses_key_and_value() {
        let var: Var = "TOKEN=a=b".parse().unwrap();
        assert_eq!(var.key, "TOKEN");
        assert_eq!(var.value, "a=b", "only the first `=` separates key and value");
        assert!("no-equals-sign".parse::<Var>().is_err());
        assert!("BAD KEY=1".parse::<Var>().is_err());
    }

    #[test]
    fn env_debug_hides_values() {
        let var: Var = "SECRET=hunter2".parse().unwrap();
        let environment = Environment::load(None, &["SECRET=hunter2".to_string()]).unwrap();
        assert!(!format!("{var:?}").contains("hunter2"), "Var's Debug hides the value");
        assert!(!format!("{environment:?}").contains("hunter2"), "Environment's Debug hides values");
        assert!(format!("{environment:?}").contains("SECRET"), "Environment's Debug names keys");
    }

    #[test]
    fn env_file_parses_dotenv_and_var_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        std::fs::write(&path, "# comment\n\nA=1\nexport B=\"two words\"\nC='3'\n").unwrap();
        let environment = Environment::load(Some(&path), &["A=override".to_string()]).unwrap();
        assert_eq!(environment.get("A"), Some("override"), "--var wins over the file");
        assert_eq!(environment.get("B"), Some("two words"));
        assert_eq!(environment.get("C"), Some("3"));
        assert_eq!(environment.len(), 3);

        std::fs::write(&path, "A=1\nnot a variable\n").unwrap();
        let err = Environment::load(Some(&path), &[]).unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "the error names the line: {err:#}");
    }
}
