//! Errors of the object store: [`ObjectError`] (opening, uploading) and the failure of one
//! block fetch, classified retryable or permanent from the HTTP status observed on the wire, or
//! from the error's type when no status was seen.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use object_store::client::HttpError;

use crate::source::{Retry, SourceError};

/// A failure to open an object source.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The URL is not one this source can open.
    #[error("object URL {url:?}: {why}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The store could not be configured.
    #[error("configuring the object store for {url}")]
    Config {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: Box<object_store::Error>,
    },
    /// The object could not be opened (its HEAD failed).
    #[error("opening {object}: {what}")]
    Open {
        /// The object.
        object: String,
        /// What went wrong (the HTTP status when known).
        what: String,
        /// Whether trying again may help.
        retry: Retry,
        /// The store's error.
        #[source]
        source: Box<object_store::Error>,
    },
    /// The object could not be stored ([`put_object`](crate::object_upload::put_object)).
    #[error("storing {object}: {what}")]
    Put {
        /// The object.
        object: String,
        /// What went wrong.
        what: String,
        /// Whether trying again may help.
        retry: Retry,
        /// The store's error.
        #[source]
        source: Box<object_store::Error>,
    },
    /// Bad options.
    #[error("invalid object source options: {0}")]
    Options(String),
    /// The cache directory could not be set up.
    #[error("setting up the cache directory {path}")]
    Cache {
        /// The cache root.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The I/O runtime could not be started.
    #[error("starting the object store I/O threads")]
    Runtime(#[source] io::Error),
}

impl ObjectError {
    /// Whether trying again may help (the store was unreachable or answered 5xx).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ObjectError::Open {
                retry: Retry::Retryable,
                ..
            } | ObjectError::Put {
                retry: Retry::Retryable,
                ..
            }
        )
    }
}

/// A failed GET, shared by every reader that waited for it.
#[derive(Debug)]
pub(super) struct FetchFailure {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) retry: Retry,
    pub(super) what: String,
    pub(super) cause: Option<Arc<object_store::Error>>,
}

impl FetchFailure {
    pub(super) fn to_source_error(&self, name: &str, offset: u64, len: u64) -> SourceError {
        let kind = match self.retry {
            Retry::Retryable => io::ErrorKind::TimedOut,
            Retry::Permanent => io::ErrorKind::Other,
        };
        SourceError {
            offset,
            len,
            source_name: name.to_string(),
            what: format!(
                "ranged GET of bytes {:#x}..{:#x} failed: {}",
                self.start, self.end, self.what
            ),
            retry: self.retry,
            cause: self
                .cause
                .as_ref()
                .map(|c| io::Error::new(kind, SharedCause(Arc::clone(c)))),
        }
    }
}

/// An `object_store` error shared between waiters, as an `io::Error` payload.
#[derive(Debug)]
pub(super) struct SharedCause(Arc<object_store::Error>);

impl std::fmt::Display for SharedCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

/// Whether an `object_store` error may go away, and a short description (without the error's
/// own text, which stays the `#[source]`). `status` is the HTTP status seen on the wire, if any.
pub(crate) fn classify(e: &object_store::Error, status: Option<u16>) -> (Retry, String) {
    use object_store::Error as E;
    let described = match e {
        E::NotFound { .. } => Some((Retry::Permanent, "object not found")),
        E::PermissionDenied { .. } => Some((Retry::Permanent, "permission denied")),
        E::Unauthenticated { .. } => Some((Retry::Permanent, "not authenticated")),
        E::Precondition { .. } => Some((
            Retry::Permanent,
            "the object changed since it was opened (its ETag no longer matches)",
        )),
        E::NotModified { .. } => Some((Retry::Permanent, "not modified")),
        E::InvalidPath { .. } => Some((Retry::Permanent, "invalid path")),
        E::NotSupported { .. } | E::NotImplemented { .. } => {
            Some((Retry::Permanent, "operation not supported by the store"))
        }
        E::UnknownConfigurationKey { .. } => Some((Retry::Permanent, "bad configuration")),
        E::AlreadyExists { .. } => Some((Retry::Permanent, "already exists")),
        E::JoinError { .. } => Some((Retry::Retryable, "task failed")),
        _ => None,
    };
    match status.filter(|s| !(200..300).contains(s)) {
        Some(s) => {
            let retry = match s {
                408 | 429 | 500..=599 => Retry::Retryable,
                _ => Retry::Permanent,
            };
            let what = match (s, described) {
                (416, _) => "range not satisfiable (the object is shorter than it was)".to_string(),
                (_, Some((_, d))) => d.to_string(),
                (500..=599, None) => "server error".to_string(),
                (408 | 429, None) => "throttled or timed out".to_string(),
                _ => "request refused".to_string(),
            };
            (retry, format!("{what} (HTTP {s})"))
        }
        None => match described {
            Some((r, d)) => (r, d.to_string()),
            None => match http_error_kind(e) {
                Some(kind) => (Retry::Retryable, format!("network error ({kind:?})")),
                // Nothing says it is permanent: let the caller retry a few times.
                None => (Retry::Retryable, "store error".to_string()),
            },
        },
    }
}

/// The transport error kind in `e`'s source chain, if the failure was a transport one.
pub(super) fn http_error_kind(
    e: &object_store::Error,
) -> Option<object_store::client::HttpErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<HttpError>() {
            return Some(h.kind());
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use object_store::client::HttpErrorKind;

    fn generic(source: Box<dyn std::error::Error + Send + Sync>) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source,
        }
    }

    #[test]
    fn statuses_decide_retry() {
        let e = generic("x".into());
        for (s, want) in [
            (500, Retry::Retryable),
            (503, Retry::Retryable),
            (429, Retry::Retryable),
            (408, Retry::Retryable),
            (416, Retry::Permanent),
            (400, Retry::Permanent),
            (403, Retry::Permanent),
        ] {
            let (r, what) = classify(&e, Some(s));
            assert_eq!(r, want, "{s}");
            assert!(what.contains(&format!("HTTP {s}")), "{what}");
        }
        assert!(classify(&e, Some(416)).1.contains("range not satisfiable"));
        // A success status with a failed body read is a transport problem, not the status.
        let body = generic(Box::new(HttpError::new(
            HttpErrorKind::Decode,
            io::Error::other("cut"),
        )));
        assert_eq!(classify(&body, Some(206)).0, Retry::Retryable);
    }

    #[test]
    fn typed_errors_decide_retry_without_a_status() {
        let nf = object_store::Error::NotFound {
            path: "k".into(),
            source: "x".into(),
        };
        assert_eq!(
            classify(&nf, None),
            (Retry::Permanent, "object not found".into())
        );
        let pd = object_store::Error::PermissionDenied {
            path: "k".into(),
            source: "x".into(),
        };
        assert_eq!(classify(&pd, None).0, Retry::Permanent);
        assert!(classify(&nf, Some(404))
            .1
            .contains("object not found (HTTP 404)"));
        let net = generic(Box::new(HttpError::new(
            HttpErrorKind::Connect,
            io::Error::other("refused"),
        )));
        let (r, what) = classify(&net, None);
        assert_eq!(r, Retry::Retryable);
        assert_eq!(what, "network error (Connect)");
        // Unknown: retryable (a few retries cost little; a wrong "permanent" poisons a page).
        assert_eq!(classify(&generic("odd".into()), None).0, Retry::Retryable);
    }

    #[test]
    fn failures_become_source_errors_naming_object_and_range() {
        let f = FetchFailure {
            start: 0x100000,
            end: 0x200000,
            retry: Retry::Permanent,
            what: "object not found (HTTP 404)".into(),
            cause: Some(Arc::new(object_store::Error::NotFound {
                path: "k".into(),
                source: "x".into(),
            })),
        };
        let e = f.to_source_error("s3://b/k", 0x101000, 4096);
        assert!(!e.is_retryable());
        let msg = e.to_string();
        assert!(msg.contains("s3://b/k"), "{msg}");
        assert!(msg.contains("0x100000..0x200000"), "{msg}");
        assert!(msg.contains("HTTP 404"), "{msg}");
        assert!(std::error::Error::source(&e).is_some());
    }
}
