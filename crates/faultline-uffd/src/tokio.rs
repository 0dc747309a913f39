//! Async event reading for tokio (the `tokio` cargo feature).
