//! Streaming verification of a blob on its way from the source to a destination registry:
//! [`Verified`] hashes and counts the bytes as they pass and fails the stream, before its last
//! byte, when the size or digest is not the one the manifest declared, so the destination never
//! commits unverified content. The outcome is left in a shared [`Verdict`] for the copier.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;

use super::copy::Progress;
use crate::manifest::{Digest, Hasher};

#[derive(Debug, Clone)]
pub(super) enum Verdict {
    Pending,
    Verified,
    Mismatch(String),
    SourceFailed(String),
}

/// A source body on its way to a destination registry, hashed and counted as it passes. It
/// ends with an error instead of its last byte when the content does not match, so the upload
/// is aborted and the destination commits nothing.
pub(super) struct Verified {
    pub(super) inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    pub(super) hasher: Option<Hasher>,
    pub(super) seen: u64,
    pub(super) size: u64,
    pub(super) digest: Digest,
    pub(super) progress: Progress,
    pub(super) verdict: Arc<StdMutex<Verdict>>,
    pub(super) kept: Option<Arc<StdMutex<Vec<u8>>>>,
    pub(super) transferred: Arc<AtomicU64>,
}

impl Verified {
    /// Checks size and digest once, when the last byte has passed (or the source ended early).
    fn verify(&mut self) -> Result<(), String> {
        let Some(hasher) = self.hasher.take() else {
            return Ok(());
        };
        let actual = hasher.finish();
        if self.seen != self.size || actual != self.digest {
            let message = format!(
                "the source served blob {} with other content ({} of {} bytes, digest {actual}); nothing was committed",
                self.digest, self.seen, self.size
            );
            self.settle(Verdict::Mismatch(message.clone()));
            return Err(message);
        }
        self.settle(Verdict::Verified);
        self.progress.finish();
        Ok(())
    }

    fn settle(&self, verdict: Verdict) {
        if let Ok(mut v) = self.verdict.lock() {
            *v = verdict;
        }
    }
}

impl Stream for Verified {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this.inner.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                this.seen += chunk.len() as u64;
                if this.seen > this.size {
                    let message = format!(
                        "the source sent more than the {} bytes of blob {}",
                        this.size, this.digest
                    );
                    this.settle(Verdict::Mismatch(message.clone()));
                    return Poll::Ready(Some(Err(std::io::Error::other(message))));
                }
                if let Some(h) = &mut this.hasher {
                    h.update(&chunk);
                }
                if let Some(kept) = &this.kept {
                    if let Ok(mut k) = kept.lock() {
                        k.extend_from_slice(&chunk);
                    }
                }
                this.transferred
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                this.progress.advance(chunk.len() as u64);
                // Decide at the last byte: with a Content-Length body, the HTTP client may
                // never ask for the end of the stream.
                if this.seen == this.size {
                    if let Err(message) = this.verify() {
                        return Poll::Ready(Some(Err(std::io::Error::other(message))));
                    }
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                let message = format!(
                    "reading blob {} from the source failed: {e}",
                    this.digest.short()
                );
                this.settle(Verdict::SourceFailed(message.clone()));
                Poll::Ready(Some(Err(std::io::Error::other(message))))
            }
            Poll::Ready(None) => match this.verify() {
                Ok(()) => Poll::Ready(None),
                Err(message) => Poll::Ready(Some(Err(std::io::Error::other(message)))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;
    use crate::ports::NoEvents;

    /// Streams `chunks` through a [`Verified`] expecting `digest` and `size`; returns what came
    /// out and the verdict left behind.
    async fn pass(
        chunks: &[&'static [u8]],
        digest: &Digest,
        size: u64,
    ) -> (Vec<Result<Bytes, String>>, Verdict) {
        let verdict = Arc::new(StdMutex::new(Verdict::Pending));
        let source = futures_util::stream::iter(
            chunks
                .iter()
                .map(|c| Ok::<_, reqwest::Error>(Bytes::from_static(c)))
                .collect::<Vec<_>>(),
        );
        let stream = Verified {
            inner: Box::pin(source),
            hasher: Some(Hasher::new(digest.algorithm())),
            seen: 0,
            size,
            digest: digest.clone(),
            progress: Progress::new(Arc::new(NoEvents), digest, size),
            verdict: verdict.clone(),
            kept: None,
            transferred: Arc::new(AtomicU64::new(0)),
        };
        let out = stream
            .map(|item| item.map_err(|e| e.to_string()))
            .collect()
            .await;
        let verdict = verdict
            .lock()
            .map(|v| v.clone())
            .unwrap_or(Verdict::Pending);
        (out, verdict)
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_matching_digest_and_size_pass_unchanged() {
        let digest = Digest::sha256_of(b"hello world");
        let (out, verdict) = pass(&[b"hello ", b"world"], &digest, 11).await;
        assert_eq!(
            out,
            [
                Ok(Bytes::from_static(b"hello ")),
                Ok(Bytes::from_static(b"world"))
            ]
        );
        assert!(matches!(verdict, Verdict::Verified), "{verdict:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn other_content_of_the_same_size_is_an_error_naming_the_digest() {
        let digest = Digest::sha256_of(b"hello world");
        let (out, verdict) = pass(&[b"hello ", b"WORLD"], &digest, 11).await;
        let last = out.last().cloned().expect("the stream yields something");
        let message = last.expect_err("the last item is the mismatch");
        assert!(message.contains(&digest.to_string()), "{message}");
        assert!(matches!(verdict, Verdict::Mismatch(_)), "{verdict:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn more_bytes_than_declared_is_an_error_naming_the_digest() {
        let digest = Digest::sha256_of(b"hello");
        let (out, verdict) = pass(&[b"hello", b" world"], &digest, 5).await;
        assert_eq!(out.first(), Some(&Ok(Bytes::from_static(b"hello"))));
        let message = out[1].clone().expect_err("the extra bytes are refused");
        assert!(message.contains("more than the 5 bytes"), "{message}");
        assert!(message.contains(&digest.to_string()), "{message}");
        assert!(matches!(verdict, Verdict::Mismatch(_)), "{verdict:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_ending_early_is_an_error_naming_the_digest() {
        let digest = Digest::sha256_of(b"hello world");
        let (out, verdict) = pass(&[b"hello"], &digest, 11).await;
        let message = out
            .last()
            .cloned()
            .expect("an item")
            .expect_err("short content is refused");
        assert!(message.contains(&digest.to_string()), "{message}");
        assert!(matches!(verdict, Verdict::Mismatch(_)), "{verdict:?}");
    }
}
