//! zstd for the `compressed-blobs/zstd` ByteStream resources and for batch entries.
//!
//! Blobs are always stored uncompressed (hashing needs the plain bytes, and other
//! front doors read them); compression happens on the wire only.

use bytes::Bytes;
use futures::{Stream, StreamExt};
use kiln_store::ChunkStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use zstd::stream::raw::{InBuffer, Operation, OutBuffer};

use crate::CoordinatorError;

/// Decoded output is handed on in pieces of at most this size, so that a small, highly
/// compressed message cannot balloon in memory.
pub const DECODED_CHUNK: usize = 1 << 20;

fn corrupt(e: std::io::Error) -> CoordinatorError {
    CoordinatorError::InvalidArgument(format!("data is not valid zstd: {e}"))
}

/// Compresses a blob's chunks into a single zstd frame, on the blocking pool.
pub(crate) fn compress_chunks(
    mut chunks: ChunkStream,
    level: i32,
) -> impl Stream<Item = Result<Bytes, CoordinatorError>> + Send + 'static {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let encoder = zstd::stream::write::Encoder::new(Vec::new(), level)
            .map_err(|e| CoordinatorError::Internal(format!("zstd encoder: {e}")));
        let mut encoder = match encoder {
            Ok(encoder) => encoder,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        while let Some(chunk) = chunks.next().await {
            let step = match chunk {
                Ok(chunk) => {
                    tokio::task::spawn_blocking(move || {
                        std::io::Write::write_all(&mut encoder, &chunk)?;
                        let compressed = std::mem::take(encoder.get_mut());
                        Ok::<_, std::io::Error>((encoder, compressed))
                    })
                    .await
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            match step {
                Ok(Ok((returned, compressed))) => {
                    encoder = returned;
                    if !compressed.is_empty() && tx.send(Ok(compressed.into())).await.is_err() {
                        return; // The reader went away.
                    }
                }
                Ok(Err(e)) => {
                    let _ = tx
                        .send(Err(CoordinatorError::Internal(e.to_string())))
                        .await;
                    return;
                }
                Err(join) => {
                    let _ = tx
                        .send(Err(CoordinatorError::Internal(join.to_string())))
                        .await;
                    return;
                }
            }
        }
        let tail = encoder
            .finish()
            .map_err(|e| CoordinatorError::Internal(format!("zstd encoder: {e}")));
        let _ = tx.send(tail.map(Bytes::from)).await;
    });
    ReceiverStream::new(rx)
}

/// A streaming zstd decoder for compressed uploads.
pub struct StreamingDecoder {
    decoder: zstd::stream::raw::Decoder<'static>,
}

impl StreamingDecoder {
    pub fn new() -> Result<Self, CoordinatorError> {
        let decoder = zstd::stream::raw::Decoder::new()
            .map_err(|e| CoordinatorError::Internal(format!("zstd decoder: {e}")))?;
        Ok(StreamingDecoder { decoder })
    }

    /// Decodes from `input[*consumed..]` until one output piece is full or the input is
    /// used up, advancing `consumed`. Call until it returns `None` to drain `input`.
    pub fn decode_next(
        &mut self,
        input: &[u8],
        consumed: &mut usize,
    ) -> Result<Option<Bytes>, CoordinatorError> {
        let mut out = Vec::with_capacity(DECODED_CHUNK);
        loop {
            let mut in_buffer = InBuffer::around(&input[*consumed..]);
            let filled = out.len();
            let mut out_buffer = OutBuffer::around_pos(&mut out, filled);
            self.decoder
                .run(&mut in_buffer, &mut out_buffer)
                .map_err(corrupt)?;
            let output_full = out_buffer.pos() == out_buffer.capacity();
            let made_progress = in_buffer.pos() > 0 || out_buffer.pos() > filled;
            *consumed += in_buffer.pos();
            // With room left in the output and the input used up, zstd has flushed all
            // it can until more input arrives.
            if output_full || *consumed == input.len() || !made_progress {
                break;
            }
        }
        Ok((!out.is_empty()).then(|| Bytes::from(out)))
    }
}

/// Decompresses a batch entry whose uncompressed size is known, refusing to produce more.
pub fn decompress(data: &[u8], uncompressed_size: u64) -> Result<Vec<u8>, CoordinatorError> {
    zstd::bulk::decompress(data, uncompressed_size as usize).map_err(corrupt)
}

pub(crate) fn compress(data: &[u8], level: i32) -> Result<Vec<u8>, CoordinatorError> {
    zstd::bulk::compress(data, level)
        .map_err(|e| CoordinatorError::Internal(format!("zstd encoder: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_decoder_matches_the_input_across_split_messages() {
        let plain: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let compressed = zstd::bulk::compress(&plain, 3).unwrap();
        let mut decoder = StreamingDecoder::new().unwrap();
        let mut decoded = Vec::new();
        for message in compressed.chunks(7_000) {
            let mut consumed = 0;
            while let Some(piece) = decoder.decode_next(message, &mut consumed).unwrap() {
                assert!(piece.len() <= DECODED_CHUNK);
                decoded.extend_from_slice(&piece);
            }
            assert_eq!(consumed, message.len());
        }
        assert_eq!(decoded, plain);
    }

    #[test]
    fn garbage_is_refused() {
        let mut decoder = StreamingDecoder::new().unwrap();
        let mut consumed = 0;
        assert!(decoder
            .decode_next(b"definitely not zstd", &mut consumed)
            .is_err());
        assert!(decompress(b"nope", 10).is_err());
    }

    #[test]
    fn bulk_decompression_stops_at_the_declared_size() {
        let compressed = compress(&[7u8; 10_000], 1).unwrap();
        assert_eq!(decompress(&compressed, 10_000).unwrap().len(), 10_000);
        assert!(decompress(&compressed, 9_999).is_err());
    }
}
