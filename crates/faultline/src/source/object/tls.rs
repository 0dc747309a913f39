//! The TLS crypto provider of the object store's HTTPS client.
//!
//! faultline links one provider, ring: object_store's `aws` feature would link aws-lc-rs (a
//! CMake/C build) besides it, so S3 is built from `aws-base` + `reqwest` + `ring`, and reqwest's
//! rustls takes the process-wide default provider, which must then be installed before the first
//! HTTPS client is built (reqwest panics otherwise).

/// Install ring as rustls' process-wide default crypto provider, unless a provider is installed
/// already (by this function or by the embedding program, whose choice is kept).
///
/// [`ObjectSource::open_url`](super::ObjectSource::open_url) and
/// [`put_object`](crate::object_upload::put_object) call this before building their store. A program that
/// builds an `object_store` S3 store itself (for [`ObjectSource::open`](super::ObjectSource::open))
/// calls it first.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may install one between the check and here: then theirs stays, which
        // is as good (install_default only fails when a provider is installed).
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Building an HTTPS client is where reqwest, linked without a provider of its own, needs
    /// one: an S3 store for an `https://` endpoint builds, and ring is the process default.
    #[test]
    fn an_https_store_builds_on_the_ring_provider() {
        let s3 = super::super::S3Config {
            endpoint: Some("https://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
            ..super::super::S3Config::default()
        };
        let url = "s3://bucket/key";
        let (b, _) = super::super::s3_builder(url, &s3).expect("builder");
        super::super::build_store(url, b).expect("an HTTPS store builds");
        let provider = rustls::crypto::CryptoProvider::get_default().expect("installed");
        install_crypto_provider(); // a second call keeps it
        assert!(std::sync::Arc::ptr_eq(
            provider,
            rustls::crypto::CryptoProvider::get_default().expect("still installed")
        ));
        assert_eq!(
            provider.cipher_suites.len(),
            rustls::crypto::ring::default_provider().cipher_suites.len()
        );
    }
}
