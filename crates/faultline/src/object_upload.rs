//! Uploading an object to an S3-compatible store ([`put_object`]): the writing side of
//! [`crate::source::ObjectSource`], e.g. to publish a memory file or an image that clones then
//! restore from.

use bytes::Bytes;
use object_store::{MultipartUpload, ObjectStoreExt};

use crate::source::object::error::classify;
use crate::source::object::store::{build_store, s3_builder};
use crate::source::object::{ObjectError, S3Config};

/// Store `bytes` as the object at `url` (`s3://bucket/key`), replacing any object there: one
/// PUT, or a multipart upload of 64 MiB parts for larger objects. Returns the new ETag.
pub fn put_object(url: &str, s3: &S3Config, bytes: Bytes) -> Result<Option<String>, ObjectError> {
    let (b, path) = s3_builder(url, s3)?;
    let store = build_store(url, b)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ObjectError::Runtime)?;
    const PART: usize = 64 << 20;
    let put = rt.block_on(async {
        if bytes.len() <= PART {
            return store
                .put(&path, object_store::PutPayload::from(bytes))
                .await
                .map(|r| r.e_tag);
        }
        let mut upload = store.put_multipart(&path).await?;
        for part in bytes.chunks(PART) {
            upload
                .put_part(object_store::PutPayload::from(bytes.slice_ref(part)))
                .await?;
        }
        upload.complete().await.map(|r| r.e_tag)
    });
    put.map_err(|source| {
        let (retry, what) = classify(&source, None);
        ObjectError::Put {
            object: url.to_string(),
            what,
            retry,
            source: Box::new(source),
        }
    })
}
