//! Setting up the S3 store: [`S3Config`], the store and object path of an `s3://` URL, the
//! instrumented HTTP connector that counts requests and records each response's status, and
//! waiting for a future on the source's runtime from a plain thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};
use object_store::path::Path as ObjectPath;

use super::error::ObjectError;
use object_store::ClientOptions;

/// Where and how to reach an S3-compatible store. Anything left `None` comes from the usual
/// `AWS_*` environment variables (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP`, ...), then from
/// `object_store`'s defaults (AWS itself, region us-east-1, instance credentials).
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    /// Endpoint URL, e.g. `http://127.0.0.1:9000` for a local server (path-style requests).
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Session token.
    pub session_token: Option<String>,
    /// Allow plain HTTP. Default: true when `endpoint` starts with `http://`.
    pub allow_http: Option<bool>,
}

/// The S3 store of `url` (`s3://bucket/key`) configured from `s3`, then the `AWS_*` variables,
/// and the object's path in it.
pub(crate) fn s3_builder(
    url: &str,
    s3: &S3Config,
) -> Result<(AmazonS3Builder, ObjectPath), ObjectError> {
    let (bucket, key) = parse_s3_url(url)?;
    let path = ObjectPath::parse(key).map_err(|e| ObjectError::Url {
        url: url.to_string(),
        why: format!("invalid key: {e}"),
    })?;
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Some(e) = &s3.endpoint {
        b = b.with_endpoint(e);
    }
    if let Some(r) = &s3.region {
        b = b.with_region(r);
    }
    if let Some(k) = &s3.access_key_id {
        b = b.with_access_key_id(k);
    }
    if let Some(k) = &s3.secret_access_key {
        b = b.with_secret_access_key(k);
    }
    if let Some(t) = &s3.session_token {
        b = b.with_token(t);
    }
    let http_endpoint = s3
        .endpoint
        .as_deref()
        .is_some_and(|e| e.starts_with("http://"));
    if let Some(allow) = s3.allow_http.or(http_endpoint.then_some(true)) {
        b = b.with_allow_http(allow);
    }
    Ok((b, path))
}

/// Build the store configured for `url`, naming it in the error.
pub(crate) fn build_store(
    url: &str,
    b: AmazonS3Builder,
) -> Result<object_store::aws::AmazonS3, ObjectError> {
    super::install_crypto_provider();
    b.build().map_err(|source| ObjectError::Config {
        url: url.to_string(),
        source: Box::new(source),
    })
}

/// Parse `s3://bucket/key` (`s3a://` too).
pub(super) fn parse_s3_url(url: &str) -> Result<(&str, &str), ObjectError> {
    let bad = |why: &str| ObjectError::Url {
        url: url.to_string(),
        why: why.to_string(),
    };
    let rest = url
        .strip_prefix("s3://")
        .or_else(|| url.strip_prefix("s3a://"))
        .ok_or_else(|| bad("expected s3://bucket/key"))?;
    let (bucket, key) = rest
        .split_once('/')
        .ok_or_else(|| bad("no key after the bucket"))?;
    if bucket.is_empty() {
        return Err(bad("empty bucket name"));
    }
    if key.is_empty() {
        return Err(bad("empty key"));
    }
    Ok((bucket, key))
}

/// Run `fut` on `rt` and wait for it from this (non-async) thread. `None` if it was cancelled.
pub(super) fn run<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().ok()
}

/// Where the HTTP client writes the final status of a request (object_store passes a GET's
/// extensions on to its HTTP request, retries included).
#[derive(Debug, Clone, Default)]
pub(super) struct StatusSlot(Arc<std::sync::atomic::AtomicU16>);

impl StatusSlot {
    pub(super) fn get(&self) -> Option<u16> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            s => Some(s),
        }
    }
}

/// The reqwest connector, counting requests and recording each response's status.
#[derive(Debug)]
pub(super) struct Instrumented {
    pub(super) requests: Arc<AtomicU64>,
}

impl HttpConnector for Instrumented {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(InstrumentedService {
            inner,
            requests: Arc::clone(&self.requests),
        }))
    }
}

#[derive(Debug)]
pub(super) struct InstrumentedService {
    pub(super) inner: HttpClient,
    pub(super) requests: Arc<AtomicU64>,
}

pub(super) type BoxFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

impl HttpService for InstrumentedService {
    // The `async_trait` shape of `HttpService::call`, written out.
    fn call<'s, 'f>(&'s self, req: HttpRequest) -> BoxFuture<'f, Result<HttpResponse, HttpError>>
    where
        's: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let slot = req.extensions().get::<StatusSlot>().cloned();
            let r = self.inner.execute(req).await;
            if let (Some(slot), Ok(resp)) = (slot, &r) {
                slot.0.store(resp.status().as_u16(), Ordering::Relaxed);
            }
            r
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;

    #[test]
    fn s3_urls_are_parsed() {
        assert_eq!(parse_s3_url("s3://b/k/x.img").unwrap(), ("b", "k/x.img"));
        assert_eq!(parse_s3_url("s3a://b/k").unwrap(), ("b", "k"));
        for bad in ["http://b/k", "s3://b", "s3:///k", "s3://b/"] {
            let e = parse_s3_url(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
