//! Credentials for a ckptd with tenants: a bearer token, and TLS trust and identity.
//!
//! Options left unset are read from the environment when the client is built, so the CLI, the
//! trainer and any program using the library pick them up the same way: `CKPT_TOKEN`, or the
//! first line of the file named by `CKPT_TOKEN_FILE`; `CKPT_TLS_CA` (PEM roots to trust beside
//! the system's), `CKPT_TLS_CERT` and `CKPT_TLS_KEY` (a client certificate for mutual TLS).
//! A token is never printed: `Token`'s Debug hides it, and errors name the variable or file,
//! not its contents.

use std::path::{Path, PathBuf};

use crate::error::ClientError;

/// A bearer token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(token: impl Into<String>) -> Token {
        Token(token.into())
    }

    /// The first line of `path`, trimmed.
    pub fn from_file(path: &Path) -> Result<Token, ClientError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ClientError::Config(format!("cannot read the token file {}: {e}", path.display())))?;
        let token = text.lines().next().unwrap_or("").trim();
        if token.is_empty() {
            return Err(ClientError::Config(format!("the token file {} is empty", path.display())));
        }
        Ok(Token(token.to_string()))
    }

    pub(crate) fn header(&self) -> Result<reqwest::header::HeaderValue, ClientError> {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", self.0))
            .map_err(|_| ClientError::Config("the token holds characters a header cannot carry".into()))?;
        v.set_sensitive(true);
        Ok(v)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<hidden>)")
    }
}

/// PEM files for TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificates to trust for ckptd's certificate, beside the system's roots.
    pub ca: Option<PathBuf>,
    /// Client certificate chain and its key, for mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The token to send: the option, else `CKPT_TOKEN`, else `CKPT_TOKEN_FILE`'s first line.
pub(crate) fn resolve_token(opt: &Option<Token>) -> Result<Option<Token>, ClientError> {
    if opt.is_some() {
        return Ok(opt.clone());
    }
    if let Some(t) = std::env::var("CKPT_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
        return Ok(Some(Token(t.trim().to_string())));
    }
    env_path("CKPT_TOKEN_FILE").map(|p| Token::from_file(&p)).transpose()
}

pub(crate) fn resolve_tls(opt: &TlsFiles) -> TlsFiles {
    TlsFiles {
        ca: opt.ca.clone().or_else(|| env_path("CKPT_TLS_CA")),
        cert: opt.cert.clone().or_else(|| env_path("CKPT_TLS_CERT")),
        key: opt.key.clone().or_else(|| env_path("CKPT_TLS_KEY")),
    }
}

/// Adds the TLS trust and identity to a client being built.
pub(crate) fn apply_tls(
    mut builder: reqwest::ClientBuilder,
    tls: &TlsFiles,
) -> Result<reqwest::ClientBuilder, ClientError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| ClientError::Config(format!("cannot read TLS file {}: {e}", p.display())))
    };
    if let Some(ca) = &tls.ca {
        let pem = read(ca)?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| ClientError::Config(format!("{}: not PEM certificates: {e}", ca.display())))?;
        if certs.is_empty() {
            return Err(ClientError::Config(format!("{} holds no certificate", ca.display())));
        }
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let mut pem = read(cert)?;
            pem.push(b'\n');
            pem.extend_from_slice(&read(key)?);
            let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
                ClientError::Config(format!("{} and {}: not a certificate and key: {e}", cert.display(), key.display()))
            })?;
            builder = builder.identity(id);
        }
        (None, None) => {}
        _ => return Err(ClientError::Config("a client certificate needs both CKPT_TLS_CERT and CKPT_TLS_KEY".into())),
    }
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_never_shown_and_files_are_read_to_their_first_line() {
        let t = Token::new("s3cr3t-value");
        assert!(!format!("{t:?}").contains("s3cr3t"));
        assert!(t.header().unwrap().is_sensitive());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tok");
        std::fs::write(&p, "abc123\nignored\n").unwrap();
        assert_eq!(Token::from_file(&p).unwrap(), Token::new("abc123"));
        std::fs::write(&p, "\n").unwrap();
        let e = Token::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        assert!(Token::new("bad\nvalue").header().is_err());
    }
}
