//! Turnpike's external configuration model: schema, loading and structural validation.
//!
//! Loading is two steps. [`parse`] turns YAML or JSON text into a [`Config`] and reports any
//! syntax or type error with its file, path and line. [`validate`] checks what types cannot
//! express (unique names, references, value ranges). Deeper checks that need compiled artefacts
//! (regular expressions, path templates) happen when `turnpike-proxy` compiles a snapshot; it
//! reports [`ConfigError`]s with a path, and [`Source::locate`] fills in the line.

pub mod config;
pub mod grpc;
mod locate;
pub mod managed;
pub mod mgmt;
pub mod observe;
pub mod policy;
mod protect;
pub mod shaping;
pub mod traffic;
pub mod transform;
mod validate;
pub mod versioning;

use std::fmt;
use std::path::Path;

pub use config::*;
pub use validate::{parse_cidr, validate};

/// One problem in a configuration, pointing at where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// File the configuration came from (`<inline>` when it did not come from a file).
    pub file: String,
    /// Path inside the document, like `routes[2].paths[0].regex`. Empty for the whole file.
    pub path: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// An error at `path`, with file and line filled in later by [`Source::locate`].
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: String::new(),
            path: path.into(),
            line: None,
            column: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        Self(vec![e])
    }
}

/// The text a configuration was read from, kept to point errors at lines.
#[derive(Debug, Clone)]
pub struct Source {
    /// File name shown in errors.
    pub file: String,
    /// Full text.
    pub text: String,
}

impl Source {
    /// Fills in `file`, `line` and `column` of errors that only know their path.
    pub fn locate(&self, errors: ConfigErrors) -> ConfigErrors {
        let index = locate::index(&self.text);
        ConfigErrors(
            errors
                .0
                .into_iter()
                .map(|mut e| {
                    e.file.clone_from(&self.file);
                    if e.line.is_none() {
                        if let Some((line, col)) = index.as_ref().and_then(|ix| ix.find(&e.path)) {
                            e.line = Some(line);
                            e.column = Some(col);
                        }
                    }
                    e
                })
                .collect(),
        )
    }
}

/// Format of a configuration text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// YAML 1.2.
    Yaml,
    /// JSON.
    Json,
}

impl Format {
    /// Guesses the format from a file name: `.json` is JSON, everything else YAML.
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("json") => Self::Json,
            _ => Self::Yaml,
        }
    }
}

/// A deserialisation error: path in the document, message, and position when serde knew it.
type PathError = (String, String, Option<(usize, usize)>);

/// Parses configuration text. Errors name the file, the path in the document and the line.
pub fn parse(source: &Source, format: Format) -> Result<Config, ConfigErrors> {
    let result: Result<Config, PathError> = match format {
        Format::Json => {
            let de = &mut serde_json::Deserializer::from_str(&source.text);
            serde_path_to_error::deserialize::<_, Config>(de).map_err(|e| {
                let inner = e.inner();
                let (line, col) = (inner.line(), inner.column());
                (
                    e.path().to_string(),
                    strip_location(&inner.to_string()),
                    (line > 0).then_some((line, col)),
                )
            })
        }
        Format::Yaml => {
            if source.text.trim().is_empty() {
                return Ok(Config::default());
            }
            // YAML is read into a JSON value first: serde_yaml wants YAML tags (`!prefix /a`)
            // for enums, while users write `{prefix: /a}`. The value loses positions, so the
            // line of a type error is found again from its path.
            let value: serde_json::Value = serde_yaml_ng::from_str(&source.text).map_err(|e| {
                let loc = e.location().map(|l| (l.line(), l.column()));
                ConfigErrors(vec![ConfigError {
                    file: source.file.clone(),
                    path: String::new(),
                    line: loc.map(|l| l.0),
                    column: loc.map(|l| l.1),
                    message: format!("invalid YAML: {}", strip_location(&e.to_string())),
                }])
            })?;
            serde_path_to_error::deserialize::<_, Config>(value)
                .map_err(|e| (e.path().to_string(), e.inner().to_string(), None))
        }
    };
    result.map_err(|(path, message, loc)| {
        let path = if path == "." { String::new() } else { path };
        let err = ConfigError {
            file: source.file.clone(),
            path,
            line: loc.map(|l| l.0),
            column: loc.map(|l| l.1),
            message,
        };
        source.locate(err.into())
    })
}

/// Reads, parses and validates a configuration file.
pub fn load_file(path: &Path) -> Result<(Config, Source), ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        path: String::new(),
        line: None,
        column: None,
        message: format!("cannot read file: {e}"),
    })?;
    let source = Source { file, text };
    let config = parse(&source, Format::from_path(path))?;
    validate(&config).map_err(|e| source.locate(e))?;
    Ok((config, source))
}

/// serde error messages end with " at line N column M"; the location is reported separately.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(text: &str) -> Source {
        Source {
            file: "test.yaml".into(),
            text: text.into(),
        }
    }

    #[test]
    fn empty_yaml_is_default() {
        let c = parse(&src(""), Format::Yaml).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn unknown_field_names_path_and_line() {
        let text =
            "upstreams:\n  - name: a\n    targets: [{address: '127.0.0.1:1'}]\n    bogus: 1\n";
        let err = parse(&src(text), Format::Yaml).unwrap_err();
        let e = &err.0[0];
        assert_eq!(e.file, "test.yaml");
        assert!(e.path.starts_with("upstreams[0]"), "{e}");
        assert!(e.message.contains("bogus"), "{e}");
        assert_eq!(e.line, Some(4), "{e}");
    }

    #[test]
    fn json_type_error_has_path_and_line() {
        let text = "{\n  \"routes\": [\n    {\"name\": \"r\", \"upstream\": \"u\", \"priority\": \"high\"}\n  ]\n}";
        let err = parse(
            &Source {
                file: "c.json".into(),
                text: text.into(),
            },
            Format::Json,
        )
        .unwrap_err();
        let e = &err.0[0];
        assert_eq!(e.path, "routes[0].priority");
        assert_eq!(e.line, Some(3));
    }

    #[test]
    fn durations_parse_humanly() {
        let c = parse(&src("server:\n  drain_timeout: 1500ms\n"), Format::Yaml).unwrap();
        assert_eq!(c.server.drain_timeout.as_millis(), 1500);
    }

    #[test]
    fn semantic_errors_are_located() {
        let text = "upstreams:\n  - name: a\n    targets: [{address: '127.0.0.1:1'}]\nroutes:\n  - name: r\n    upstream: missing\n";
        let config = parse(&src(text), Format::Yaml).unwrap();
        let err = src(text).locate(validate(&config).unwrap_err());
        let e = &err.0[0];
        assert_eq!(e.path, "routes[0].upstream");
        assert_eq!(e.line, Some(6), "{e}");
        assert!(e.to_string().starts_with("test.yaml:6:"), "{e}");
    }

    #[test]
    fn hmac_keys_need_one_secret_and_a_unique_key_id() {
        let text = "consumers:\n  - name: a\n    hmac: [{key_id: k1, secret: s}, {key_id: k2}]\n  - name: b\n    hmac: [{key_id: k1, secret_env: B_SECRET}, {key_id: k3, secret: x, secret_env: X}]\n";
        let config = parse(&src(text), Format::Yaml).unwrap();
        let shown = format!("{:?}", config.consumers[1].hmac[1]);
        assert!(
            shown.contains("<redacted>") && !shown.contains("\"x\""),
            "{shown}"
        );
        let err = validate(&config).unwrap_err();
        let paths: Vec<&str> = err.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "consumers[0].hmac[1]",
                "consumers[1].hmac[0].key_id",
                "consumers[1].hmac[1]"
            ],
            "{err:?}"
        );
    }

    #[test]
    fn a_certificate_name_identifies_one_consumer() {
        let text = "consumers:\n  - {name: a, mtls: [{san: Svc.Example}]}\n  - {name: b, mtls: [{subject: 'CN=b'}, {san: 'DNS:svc.example'}]}\nserver:\n  listeners:\n    - address: '127.0.0.1:0'\n      tls: {certificates: [{cert: c, key: k}], client_auth: {ca: ''}}\n";
        let config = parse(&src(text), Format::Yaml).unwrap();
        let tls = config.server.listeners[0].tls.as_ref().unwrap();
        let client_auth = tls.client_auth.as_ref().unwrap();
        assert_eq!(
            client_auth.mode,
            ClientAuthMode::Required,
            "the safe default"
        );
        let err = validate(&config).unwrap_err().to_string();
        assert!(err.contains("consumers[1].mtls[1].san"), "{err}");
        assert!(!err.contains("consumers[1].mtls[0]"), "{err}");
        assert!(
            err.contains("server.listeners[0].tls.client_auth.ca"),
            "{err}"
        );
        let text = "consumers:\n  - {name: a, mtls: [{san: x, subject: y}]}\n";
        assert!(
            parse(&src(text), Format::Yaml).is_err(),
            "one of subject or san"
        );
    }

    #[test]
    fn certificate_sans_are_keyed_as_the_gateway_compares_them() {
        use crate::managed::mtls_san_key;
        assert_eq!(mtls_san_key("Svc.Example"), "svc.example");
        assert_eq!(mtls_san_key("DNS:Svc.Example"), "DNS:svc.example");
        assert_eq!(mtls_san_key("IP:2001:DB8:0::1"), "IP:2001:db8::1");
        assert_eq!(mtls_san_key("2001:DB8::1"), "2001:db8::1");
        assert_eq!(mtls_san_key("URI:spiffe://x/Y"), "URI:spiffe://x/Y");
        assert_eq!(mtls_san_key("Ops@Example.com"), "Ops@Example.com");
        use crate::managed::mtls_san_claim;
        assert_eq!(
            mtls_san_claim("DNS:Svc.Example"),
            mtls_san_claim("svc.example")
        );
        assert_eq!(mtls_san_claim("IP:192.0.2.7"), "192.0.2.7");
    }
}
