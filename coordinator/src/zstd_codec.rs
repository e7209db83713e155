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

/// The largest window a compressed upload may use: 16 MiB.
const MAX_WINDOW_LOG: u32 = 24;

/// A streaming zstd decoder for compressed uploads.
pub struct StreamingDecoder {
    decoder: zstd::stream::raw::Decoder<'static>,
    /// The last call stopped with its output piece full, so zstd may hold more output,
    /// which a call with no new input must still drain.
    output_pending: bool,
}

impl StreamingDecoder {
    pub fn new() -> Result<Self, CoordinatorError> {
        let internal = |e| CoordinatorError::Internal(format!("zstd decoder: {e}"));
        let mut decoder = zstd::stream::raw::Decoder::new().map_err(internal)?;
        // A frame's header names the window the decoder must hold; zstd's default cap is
        // 128 MiB, which a few hostile bytes per upload could claim. Clients compress
        // with far smaller windows (8 MiB up to level 19).
        decoder
            .set_parameter(zstd::stream::raw::DParameter::WindowLogMax(MAX_WINDOW_LOG))
            .map_err(internal)?;
        Ok(StreamingDecoder {
            decoder,
            output_pending: false,
        })
    }

    /// Decodes from `input[*consumed..]` until one output piece is full or the input is
    /// used up, advancing `consumed`. Call until it returns `None` to drain `input`.
    pub fn decode_next(
        &mut self,
        input: &[u8],
        consumed: &mut usize,
    ) -> Result<Option<Bytes>, CoordinatorError> {
        // zstd fails a stream after 16 calls in a row that neither read nor write ("no
        // forward progress"), and ByteStream allows any number of empty messages: with
        // no input left and nothing pending, there is nothing to ask zstd.
        if *consumed == input.len() && !self.output_pending {
            return Ok(None);
        }
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
                self.output_pending = output_full;
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
    fn empty_messages_anywhere_in_a_stream_are_accepted() {
        // Found by fuzz/zstd_decode: sixteen empty messages in a row within a frame made
        // zstd fail the stream for lack of progress.
        let plain: Vec<u8> = (0..100_000u32).map(|i| (i % 13) as u8).collect();
        let compressed = zstd::bulk::compress(&plain, 3).unwrap();
        let mut decoder = StreamingDecoder::new().unwrap();
        let mut decoded = Vec::new();
        let empty: &[u8] = &[];
        for message in compressed.chunks(5) {
            for input in std::iter::repeat_n(empty, 20).chain([message]) {
                let mut consumed = 0;
                while let Some(piece) = decoder.decode_next(input, &mut consumed).unwrap() {
                    decoded.extend_from_slice(&piece);
                }
            }
        }
        assert_eq!(decoded, plain);
    }

    #[test]
    fn a_frame_that_wants_a_huge_window_is_refused() {
        let plain = vec![5u8; 1 << 20];
        let compressed = zstd::stream::encode_all(&plain[..], 3).unwrap();
        // The default window is accepted...
        let mut decoder = StreamingDecoder::new().unwrap();
        let mut consumed = 0;
        while decoder
            .decode_next(&compressed, &mut consumed)
            .unwrap()
            .is_some()
        {}
        // ...and one that declares a 128 MiB window (as a hostile or an --ultra client may,
        // in a few bytes) is not.
        let mut large = Vec::new();
        {
            let mut writer = zstd::stream::Encoder::new(&mut large, 3).unwrap();
            writer.window_log(27).unwrap();
            writer.include_contentsize(false).unwrap();
            std::io::Write::write_all(&mut writer, &plain).unwrap();
            writer.finish().unwrap();
        }
        let mut decoder = StreamingDecoder::new().unwrap();
        let mut consumed = 0;
        let refused = loop {
            match decoder.decode_next(&large, &mut consumed) {
                Ok(Some(_)) => continue,
                Ok(None) => break None,
                Err(error) => break Some(error),
            }
        };
        assert!(refused.is_some(), "a 128 MiB window was accepted");
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
