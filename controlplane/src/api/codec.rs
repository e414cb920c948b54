//! The API's protobuf codec: prost's, except for what a message that does
//! not decode becomes.
//!
//! Owns: decoding and encoding the API's messages. tonic turns a codec's
//! decoding error into whatever status the codec returns, and prost's codec
//! returns INTERNAL; a request that is not valid protobuf (an unknown wire
//! type, a string that is not UTF-8, a length past the end) is the caller's
//! error, so this one returns INVALID_ARGUMENT with prost's message, which
//! names the message and field. Must not: change the encoding.

use prost::Message;
use std::marker::PhantomData;
use tonic::Status;
use tonic::codec::{DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// The codec the generated services and clients use (`build.rs`).
pub(crate) struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = MessageDecoder<U>;

    fn encoder(&mut self) -> ProstEncoder<T> {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> MessageDecoder<U> {
        MessageDecoder(PhantomData)
    }
}

/// Decodes a `U`; what does not decode is INVALID_ARGUMENT.
pub(crate) struct MessageDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for MessageDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(src).map(Some).map_err(|e| Status::invalid_argument(e.to_string()))
    }
}
