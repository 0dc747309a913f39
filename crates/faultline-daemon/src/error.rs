//! The daemon's error: a message naming what failed, over the error that caused it.
//!
//! The daemon reports what went wrong the way an operator reads it: "opening the memory file
//! /x: No such file or directory". [`Error`] keeps the context as its message and the cause as
//! its [`source`](std::error::Error::source), so a caller's error reporter (`anyhow`'s `{:#}`,
//! or its "Caused by:" list) shows the whole chain. `{:#}` of an [`Error`] itself prints the
//! chain on one line, as the daemon's logs do.

use std::fmt;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error of the daemon: what it was doing, and why that failed.
#[derive(Debug)]
pub struct Error {
    /// What failed; `None`: this error is `source` itself (converted with `?`).
    msg: Option<String>,
    source: Option<BoxError>,
}

/// `Result` with the daemon's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with only a message.
    pub fn msg(msg: impl fmt::Display) -> Error {
        Error {
            msg: Some(msg.to_string()),
            source: None,
        }
    }

    /// `source`, explained by `msg`.
    pub fn context(msg: impl fmt::Display, source: impl Into<BoxError>) -> Error {
        Error {
            msg: Some(msg.to_string()),
            source: Some(source.into()),
        }
    }

    /// Wrap any error (its message is this error's message).
    pub fn new(source: impl Into<BoxError>) -> Error {
        Error {
            msg: None,
            source: Some(source.into()),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first: &dyn fmt::Display = match (&self.msg, &self.source) {
            (Some(m), _) => m,
            (None, Some(s)) => s,
            (None, None) => &"error",
        };
        write!(f, "{first}")?;
        if f.alternate() {
            let mut next = std::error::Error::source(self);
            while let Some(e) = next {
                write!(f, ": {e}")?;
                next = e.source();
            }
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match (&self.msg, &self.source) {
            (Some(_), Some(s)) => Some(&**s),
            // Transparent: this error displays as its source, so the chain goes on below it.
            (None, Some(s)) => s.source(),
            (_, None) => None,
        }
    }
}

macro_rules! from_errors {
    ($($t:ty),* $(,)?) => {
        $(impl From<$t> for Error {
            fn from(e: $t) -> Error {
                Error::new(e)
            }
        })*
    };
}

from_errors!(
    std::io::Error,
    rustix::io::Errno,
    serde_json::Error,
    faultline::ServerError,
    faultline::SourceError,
    faultline::firecracker::HandshakeError,
    faultline::image::ImageError,
    faultline::remote::RemoteError,
    faultline::policy::WorkingSetError,
    faultline::peer::PeerError,
    faultline_uffd::Error,
);

/// Adds a message to a failure, as `anyhow::Context` does (libraries here do not use anyhow).
pub trait Context<T> {
    /// Explain the error with `msg`.
    fn context(self, msg: impl fmt::Display) -> Result<T>;
    /// Explain the error with the message `f` makes (only on failure).
    fn with_context<M: fmt::Display>(self, f: impl FnOnce() -> M) -> Result<T>;
}

impl<T, E: Into<BoxError>> Context<T> for std::result::Result<T, E> {
    fn context(self, msg: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error::context(msg, e))
    }
    fn with_context<M: fmt::Display>(self, f: impl FnOnce() -> M) -> Result<T> {
        self.map_err(|e| Error::context(f(), e))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, msg: impl fmt::Display) -> Result<T> {
        self.ok_or_else(|| Error::msg(msg))
    }
    fn with_context<M: fmt::Display>(self, f: impl FnOnce() -> M) -> Result<T> {
        self.ok_or_else(|| Error::msg(f()))
    }
}

/// Return early with an [`Error`] made from a format string.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::msg(format!($($arg)*)))
    };
}
pub(crate) use bail;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alternate_form_shows_the_whole_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = Err::<(), _>(io).context("opening x").context("starting");
        let e = e.expect_err("an error");
        assert_eq!(e.to_string(), "starting");
        assert_eq!(format!("{e:#}"), "starting: opening x: gone");
        let t = Error::new(std::io::Error::other("plain"));
        assert_eq!(format!("{t:#}"), "plain");
    }
}
