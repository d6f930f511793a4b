//! How `ckpt` speaks to people and to scripts: failures classified into stable codes and exit
//! statuses (one line of text, or a JSON object under `--json`), and human forms of times,
//! sizes, counts and metadata.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ckpt_client::ClientError;

/// Exit statuses, documented in the README ("Exit codes").
pub mod exit {
    /// A verification (or a restore) found corrupt data.
    pub const CORRUPT: i32 = 1;
    /// The command line or an argument is wrong.
    pub const USAGE: i32 = 2;
    /// The job, step or rank does not exist.
    pub const NOT_FOUND: i32 = 3;
    /// ckptd cannot be reached, the URL is malformed, or what answered is not ckptd.
    pub const UNREACHABLE: i32 = 4;
    /// Refused: a conflict (the newest checkpoint without --force, a non-empty --out).
    pub const REFUSED: i32 = 5;
    /// Anything else (ckptd's store failing, an internal error).
    pub const OTHER: i32 = 6;
}

/// Failures the CLI itself finds (the others come from the client library).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Usage(String),
}

/// A failure as the user sees it: a stable code, an exit status, one line.
#[derive(Debug, serde::Serialize)]
pub struct Failure {
    pub code: &'static str,
    pub exit: i32,
    pub message: String,
}

pub fn classify(e: &anyhow::Error, server: &str) -> Failure {
    // The chain of contexts down to the first error of ours; what lies below it (reqwest's
    // layers) that error has already said in its own words.
    let mut parts = Vec::new();
    for cause in e.chain() {
        parts.push(cause.to_string());
        if cause.is::<ClientError>() || cause.is::<CliError>() {
            break;
        }
    }
    let message = parts.join(": ").replace('\n', " ");
    let f = |code, exit| Failure { code, exit, message: message.clone() };
    if let Some(c) = e.downcast_ref::<CliError>() {
        return match c {
            CliError::NotFound(_) => f("not_found", exit::NOT_FOUND),
            CliError::Refused(_) => f("refused", exit::REFUSED),
            CliError::Usage(_) => f("usage", exit::USAGE),
        };
    }
    let Some(c) = e.downcast_ref::<ClientError>() else { return f("error", exit::OTHER) };
    match c {
        ClientError::Transport { .. } if c.is_unreachable() => Failure {
            code: "unreachable",
            exit: exit::UNREACHABLE,
            message: format!("{message} (is ckptd running there? set --server or CKPT_SERVER)"),
        },
        ClientError::Transport { .. } if c.is_timeout() => Failure {
            code: "no_answer",
            exit: exit::UNREACHABLE,
            message: format!("{message} (ckptd at {server} took the request and did not answer in time: stopped or overloaded? see --answer-timeout)"),
        },
        ClientError::Transport { .. } => f("transport", exit::UNREACHABLE),
        ClientError::InvalidUrl { .. } => f("invalid_url", exit::UNREACHABLE),
        ClientError::Api { code, status, .. } if code == "http_error" => Failure {
            code: "not_ckptd",
            exit: exit::UNREACHABLE,
            message: format!(
                "the server at {server} is not ckptd (it answered HTTP {status} without ckptd's error body)"
            ),
        },
        ClientError::Protocol(_) => f("protocol", exit::UNREACHABLE),
        ClientError::Api { status: 401, .. } => Failure {
            code: "unauthorized",
            exit: exit::REFUSED,
            message: format!("{message} (give the tenant's token as CKPT_TOKEN or CKPT_TOKEN_FILE)"),
        },
        ClientError::Api { status: 403, .. } => f("forbidden", exit::REFUSED),
        ClientError::Api { status: 429, code, .. } if code == "rate_limited" => f("rate_limited", exit::REFUSED),
        ClientError::Api { status: 429, .. } => f("over_quota", exit::REFUSED),
        ClientError::Config(_) => f("usage", exit::USAGE),
        ClientError::Api { status: 404, .. } | ClientError::NoSuchRank { .. } => f("not_found", exit::NOT_FOUND),
        ClientError::Api { status: 409, .. } | ClientError::Aborted { .. } => f("conflict", exit::REFUSED),
        ClientError::Api { status: 400, .. } | ClientError::Core(_) | ClientError::InvalidTensor { .. } => {
            f("invalid_input", exit::USAGE)
        }
        ClientError::CorruptChunk { .. } | ClientError::CorruptManifest { .. } => f("corrupt", exit::CORRUPT),
        ClientError::Api { .. } | ClientError::Timeout(_) | ClientError::Daemon(_) | ClientError::Internal(_) => {
            f("error", exit::OTHER)
        }
    }
}

/// Prints a failure (stderr as text, stdout as JSON) and returns its exit status.
pub fn report(failure: &Failure, json: bool) -> i32 {
    if json {
        let v = serde_json::json!({ "error": failure });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        eprintln!("error: {}", failure.message);
    }
    failure.exit
}

/// `2026-11-30 21:07:35 (5 minutes ago)` in the local time zone.
pub fn when(unix_ms: u64) -> String {
    let Some(t) = chrono::DateTime::from_timestamp_millis(unix_ms as i64) else { return format!("{unix_ms} ms") };
    let local = t.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S");
    format!("{local} ({})", age(unix_ms))
}

/// "5 minutes ago", "in the future" for a clock ahead of this one.
pub fn age(unix_ms: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    match now.checked_sub(unix_ms) {
        Some(ms) if ms < 1000 => "just now".into(),
        Some(ms) => format!("{} ago", indicatif::HumanDuration(Duration::from_millis(ms))),
        None => "in the future".into(),
    }
}

/// 1.5 MiB, 12 B.
pub fn size(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

/// "1 chunk", "3 chunks".
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Metadata for reading: numbers that are f32 values widened to f64 (the trainer saves f32) are
/// shown as the f32 prints, not with the widening's noise (0.9, not 0.8999999761581421).
pub fn metadata(v: &serde_json::Value) -> String {
    fn tidy(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Number(n) => match n.as_f64() {
                Some(x) if n.is_f64() && (x as f32) as f64 == x => {
                    let short: f64 = (x as f32).to_string().parse().unwrap_or(x);
                    serde_json::Number::from_f64(short).map_or(v.clone(), serde_json::Value::Number)
                }
                _ => v.clone(),
            },
            serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(tidy).collect()),
            serde_json::Value::Object(o) => {
                serde_json::Value::Object(o.iter().map(|(k, v)| (k.clone(), tidy(v))).collect())
            }
            other => other.clone(),
        }
    }
    tidy(v).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_forms() {
        assert_eq!(count(1, "chunk", "chunks"), "1 chunk");
        assert_eq!(count(0, "chunk", "chunks"), "0 chunks");
        assert_eq!(size(1536 * 1024), "1.50 MiB");
        assert_eq!(
            metadata(&serde_json::json!({"lr": 0.8999999761581421_f64, "step": 3, "x": 0.1})),
            r#"{"lr":0.9,"step":3,"x":0.1}"#
        );
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        assert!(age(now - 300_000).ends_with("minutes ago"), "{}", age(now - 300_000));
        assert_eq!(age(now + 60_000), "in the future");
    }

    #[test]
    fn failures_have_stable_codes() {
        let server = "http://127.0.0.1:1";
        let api = |status, code: &str| {
            anyhow::Error::new(ClientError::Api { status, code: code.into(), message: "m".into() })
        };
        assert_eq!(classify(&api(404, "not_found"), server).exit, exit::NOT_FOUND);
        assert_eq!(classify(&api(404, "http_error"), server).code, "not_ckptd");
        assert_eq!(classify(&api(409, "conflict"), server).exit, exit::REFUSED);
        assert_eq!(classify(&anyhow::Error::new(CliError::NotFound("x".into())), server).code, "not_found");
        assert_eq!(classify(&anyhow::anyhow!("other"), server).exit, exit::OTHER);
    }
}
