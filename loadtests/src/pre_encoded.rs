//! Unary calls whose request is encoded once, before the clock starts, and whose response
//! is only walked, not decoded into messages. With client and server in one process on two
//! cores, a prost client would charge the server's latency with work that a real client
//! (Bazel, in its own process) does on its own CPU: cloning and encoding 10,000 digests a
//! call, and decoding thousands back.

use bytes::{Buf, BufMut, Bytes};
use kiln_proto::prost::encoding::{decode_key, skip_field, DecodeContext};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// Sends and receives message bodies as bytes.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Calls the unary method at `path` (`/package.Service/Method`) with an encoded request.
pub async fn unary(
    channel: &tonic::transport::Channel,
    path: &'static str,
    request: Bytes,
) -> Result<Bytes, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static(path);
    Ok(grpc
        .unary(tonic::Request::new(request), path, RawCodec)
        .await?
        .into_inner())
}

/// How many times field `field` occurs at the top level of an encoded message: the length
/// of a repeated field, without decoding its elements.
pub fn count_field(
    mut message: Bytes,
    field: u32,
) -> Result<usize, kiln_proto::prost::DecodeError> {
    let mut count = 0;
    while message.has_remaining() {
        let (tag, wire_type) = decode_key(&mut message)?;
        skip_field(wire_type, tag, &mut message, DecodeContext::default())?;
        count += usize::from(tag == field);
    }
    Ok(count)
}
