//! Rewrites the HTTP/2 `:authority` of requests on the Workload API socket.
//!
//! gRPC C-core (grpcio, py-spiffe, Ruby, C++) sends the Unix socket path
//! as the `:authority` of every request (grpcio 1.85 sends
//! `tmp%2Fdir%2Fapi.sock`). hyper's `h2` server refuses such a value as a
//! malformed authority and resets the stream with PROTOCOL_ERROR, and its
//! maintainers will not relax that check. On a Unix socket the authority
//! names nothing, so this adapter, sitting between the accepted socket and
//! the HTTP/2 server, replaces the `:authority` of every request with
//! `localhost` (what grpc-go sends).
//!
//! Only the client-to-server direction is touched, and in it only header
//! blocks (HEADERS and its CONTINUATION frames):
//!
//! - the 24-byte connection preface and every other frame pass through byte
//!   for byte (DATA payloads are streamed, never buffered whole);
//! - a header block is collected (at most [`MAX_HEADER_BLOCK`] bytes),
//!   decoded with an HPACK decoder that mirrors the client's encoder, and
//!   encoded again with our own encoder, whose dynamic table the server's
//!   decoder mirrors in turn; padding is dropped, the PRIORITY fields and
//!   END_STREAM are kept, and the block is split into frames of at most
//!   16,384 bytes (the smallest SETTINGS_MAX_FRAME_SIZE a peer may use).
//!
//! Input that is not HTTP/2 as the client must send it becomes an
//! [`io::Error`] of kind `InvalidData`, which closes the connection.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::workload::h2_frames::{
    split_headers_payload, write_header_frames, FLAG_END_HEADERS, FLAG_END_STREAM,
    FRAME_CONTINUATION, FRAME_HEADERS, FRAME_HEADER_LEN, PREFACE, PRIORITY_LEN,
};

/// Largest header block (HEADERS + CONTINUATION payloads) accepted.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Largest decoded header list accepted (RFC 7541 sizes: name + value + 32
/// per field), so a small block cannot expand without bound through
/// references into the dynamic table.
pub const MAX_HEADER_LIST: usize = 256 * 1024;
/// The dynamic table size both HPACK contexts start with (RFC 7541 §4.2 /
/// SETTINGS_HEADER_TABLE_SIZE default); the agent's server never changes it.
const HPACK_TABLE_SIZE: usize = 4096;
/// What every request's `:authority` becomes.
pub const REWRITTEN_AUTHORITY: &[u8] = b"localhost";

/// Why a client's bytes could not be rewritten.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// The connection did not start with the HTTP/2 client preface.
    #[error("not an HTTP/2 connection: bad client preface")]
    BadPreface,
    /// A header block grew past [`MAX_HEADER_BLOCK`].
    #[error("header block larger than {MAX_HEADER_BLOCK} bytes")]
    HeaderBlockTooLarge,
    /// A header block decoded to more than [`MAX_HEADER_LIST`] bytes.
    #[error("header list larger than {MAX_HEADER_LIST} bytes")]
    HeaderListTooLarge,
    /// A frame other than CONTINUATION on the same stream interrupted a
    /// header block, or a CONTINUATION came without one.
    #[error("unexpected frame type {frame_type:#x} on stream {stream}")]
    UnexpectedFrame {
        /// The frame type.
        frame_type: u8,
        /// The stream ID.
        stream: u32,
    },
    /// HEADERS on stream 0.
    #[error("HEADERS frame on stream 0")]
    HeadersOnStreamZero,
    /// Padding or PRIORITY fields longer than the frame.
    #[error("HEADERS frame too short for its padding or priority fields")]
    BadPadding,
    /// The header block is not valid HPACK.
    #[error("invalid HPACK header block: {0}")]
    Hpack(loona_hpack::decoder::DecoderError),
    /// An earlier error closed this connection.
    #[error("connection already failed")]
    Failed,
}

impl From<AuthorityError> for io::Error {
    fn from(e: AuthorityError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Where the parser is in the client's byte stream.
#[derive(Debug, Clone, Copy)]
enum State {
    Preface,
    FrameHeader,
    /// Inside the payload of a frame that passes through unchanged.
    PassThrough {
        remaining: usize,
    },
    /// Waiting for the whole payload of a HEADERS or CONTINUATION frame.
    HeaderPayload {
        frame_type: u8,
        flags: u8,
        stream: u32,
        len: usize,
    },
    Failed,
}

/// A header block being collected from HEADERS + CONTINUATION frames.
#[derive(Debug)]
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    fragment: Vec<u8>,
}

/// The client-to-server transcoder, independent of any I/O.
pub struct AuthorityRewriter {
    state: State,
    /// Bytes received and not yet consumed (a frame header or a header
    /// frame's payload being completed).
    pending: Vec<u8>,
    open: Option<OpenBlock>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
}

impl std::fmt::Debug for AuthorityRewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityRewriter")
            .field("state", &self.state)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Default for AuthorityRewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl AuthorityRewriter {
    /// A rewriter for a new connection (expecting the client preface).
    pub fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE_SIZE);
        let mut encoder = Encoder::new();
        encoder.set_max_table_size(HPACK_TABLE_SIZE);
        Self { state: State::Preface, pending: Vec::new(), open: None, decoder, encoder }
    }

    /// Consumes `input` (any number of bytes, split anywhere) and appends
    /// the rewritten bytes ready for the server to `out`. After an error
    /// every later call fails too.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), AuthorityError> {
        if matches!(self.state, State::Failed) {
            return Err(AuthorityError::Failed);
        }
        self.pending.extend_from_slice(input);
        let mut pos = 0;
        let result = self.process(&mut pos, out);
        self.pending.drain(..pos.min(self.pending.len()));
        if result.is_err() {
            self.state = State::Failed;
            self.pending = Vec::new();
            self.open = None;
        }
        result
    }

    fn process(&mut self, pos: &mut usize, out: &mut Vec<u8>) -> Result<(), AuthorityError> {
        loop {
            let available = self.pending.get(*pos..).unwrap_or_default();
            match self.state {
                State::Failed => return Err(AuthorityError::Failed),
                State::Preface => {
                    let n = available.len().min(PREFACE.len());
                    if available.get(..n) != PREFACE.get(..n) {
                        return Err(AuthorityError::BadPreface);
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    out.extend_from_slice(PREFACE);
                    *pos += PREFACE.len();
                    self.state = State::FrameHeader;
                }
                State::FrameHeader => {
                    let Some(header) = available.get(..FRAME_HEADER_LEN) else {
                        return Ok(());
                    };
                    let len = usize::from(header[0]) << 16
                        | usize::from(header[1]) << 8
                        | usize::from(header[2]);
                    let (frame_type, flags) = (header[3], header[4]);
                    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]])
                        & 0x7fff_ffff;
                    let in_block = self.open.as_ref().map(|b| b.stream);
                    match (frame_type, in_block) {
                        (FRAME_CONTINUATION, Some(open)) if open == stream => {}
                        (FRAME_HEADERS, None) if stream == 0 => {
                            return Err(AuthorityError::HeadersOnStreamZero)
                        }
                        (FRAME_HEADERS, None) => {}
                        (FRAME_CONTINUATION, _) | (_, Some(_)) => {
                            return Err(AuthorityError::UnexpectedFrame { frame_type, stream })
                        }
                        (_, None) => {
                            out.extend_from_slice(header);
                            *pos += FRAME_HEADER_LEN;
                            self.state = State::PassThrough { remaining: len };
                            continue;
                        }
                    }
                    let collected = self.open.as_ref().map_or(0, |b| b.fragment.len());
                    if collected + len > MAX_HEADER_BLOCK {
                        return Err(AuthorityError::HeaderBlockTooLarge);
                    }
                    *pos += FRAME_HEADER_LEN;
                    self.state = State::HeaderPayload { frame_type, flags, stream, len };
                }
                State::PassThrough { remaining } => {
                    if remaining == 0 {
                        self.state = State::FrameHeader;
                        continue;
                    }
                    if available.is_empty() {
                        return Ok(());
                    }
                    let n = remaining.min(available.len());
                    out.extend_from_slice(&available[..n]);
                    *pos += n;
                    self.state = State::PassThrough { remaining: remaining - n };
                }
                State::HeaderPayload { frame_type, flags, stream, len } => {
                    let Some(payload) = available.get(..len) else {
                        return Ok(());
                    };
                    if frame_type == FRAME_HEADERS {
                        let (priority, fragment) = split_headers_payload(flags, payload)
                            .ok_or(AuthorityError::BadPadding)?;
                        self.open = Some(OpenBlock {
                            stream,
                            end_stream: flags & FLAG_END_STREAM != 0,
                            priority,
                            fragment: fragment.to_vec(),
                        });
                    } else if let Some(open) = self.open.as_mut() {
                        open.fragment.extend_from_slice(payload);
                    }
                    *pos += len;
                    self.state = State::FrameHeader;
                    if flags & FLAG_END_HEADERS != 0 {
                        if let Some(block) = self.open.take() {
                            self.rewrite_block(&block, out)?;
                        }
                    }
                }
            }
        }
    }

    /// Decodes one complete header block, replaces `:authority` and writes
    /// it out again as HEADERS + CONTINUATION frames.
    fn rewrite_block(
        &mut self,
        block: &OpenBlock,
        out: &mut Vec<u8>,
    ) -> Result<(), AuthorityError> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut list_size = 0usize;
        // The whole block is always decoded, so the decoder's dynamic table
        // stays in step with the client's encoder.
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                list_size = list_size.saturating_add(name.len() + value.len() + 32);
                if list_size > MAX_HEADER_LIST {
                    return;
                }
                let value = if name.as_ref() == b":authority" {
                    REWRITTEN_AUTHORITY.to_vec()
                } else {
                    value.into_owned()
                };
                fields.push((name.into_owned(), value));
            })
            .map_err(AuthorityError::Hpack)?;
        if list_size > MAX_HEADER_LIST {
            return Err(AuthorityError::HeaderListTooLarge);
        }
        let encoded = self.encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        write_header_frames(block.stream, block.end_stream, block.priority, &encoded, out);
        Ok(())
    }
}

/// A connection whose client-to-server bytes go through an
/// [`AuthorityRewriter`]; writes pass straight through.
#[derive(Debug)]
pub struct RewriteAuthority<S> {
    inner: S,
    rewriter: AuthorityRewriter,
    /// Rewritten bytes not yet handed to the reader.
    out: Vec<u8>,
    out_pos: usize,
    /// Where reads land: capacity only, never filled in, so a connection
    /// costs the memory its bytes touch, not 16 KiB written at accept.
    input: Vec<u8>,
}

impl<S> RewriteAuthority<S> {
    /// Wraps a freshly accepted connection.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: AuthorityRewriter::new(),
            out: Vec::new(),
            out_pos: 0,
            input: Vec::with_capacity(16 * 1024),
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RewriteAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut input = ReadBuf::uninit(this.input.spare_capacity_mut());
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut input))?;
            if input.filled().is_empty() {
                return Poll::Ready(Ok(())); // end of stream
            }
            this.rewriter.feed(input.filled(), &mut this.out)?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RewriteAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::h2_frames::{
        write_frame_header, FLAG_PADDED, FLAG_PRIORITY, MAX_FRAME_PAYLOAD,
    };
    use proptest::prelude::*;

    /// The HEADERS frame grpcio 1.85.1 (grpc-c 58) sent for FetchX509SVID
    /// over `unix:///tmp/wt-agent-repro/cap.sock`, captured on the wire:
    /// `:authority` is `tmp%2Fwt-agent-repro%2Fcap.sock`.
    const GRPCIO_HEADERS: &str = "00010601040000000140053a70617468202f537069666665576f726b6c6f61644150492f46657463685835303953564944400a3a617574686f726974791f746d7025324677742d6167656e742d726570726f2532466361702e736f636b8386400c636f6e74656e742d74797065106170706c69636174696f6e2f677270634002746508747261696c6572734014677270632d6163636570742d656e636f64696e67176964656e746974792c206465666c6174652c20677a6970400a757365722d6167656e7430677270632d707974686f6e2f312e38352e3120677270632d632f35382e302e3020286c696e75783b20636874747032290012776f726b6c6f61642e7370696666652e696f0474727565";

    fn frame(frame_type: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame_header(&mut out, payload.len(), frame_type, flags, stream);
        out.extend_from_slice(payload);
        out
    }

    /// Parses the rewritten bytes: frames after the preface, header blocks
    /// decoded with a fresh decoder (as the server would).
    #[derive(Debug, PartialEq)]
    enum Parsed {
        Headers { stream: u32, flags: u8, priority: Option<Vec<u8>>, fields: Vec<(String, String)> },
        Other(Vec<u8>),
    }

    fn parse_output(bytes: &[u8]) -> Vec<Parsed> {
        assert_eq!(&bytes[..24], PREFACE);
        let mut decoder = Decoder::new();
        let mut rest = &bytes[24..];
        let mut parsed = Vec::new();
        // (stream, flags, priority, fragment) of the block being collected.
        type Collecting = (u32, u8, Option<Vec<u8>>, Vec<u8>);
        let mut block: Option<Collecting> = None;
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            assert!(len <= MAX_FRAME_PAYLOAD);
            let (frame_type, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            let payload = &rest[9..9 + len];
            match frame_type {
                FRAME_HEADERS => {
                    assert_eq!(flags & FLAG_PADDED, 0, "padding is stripped");
                    let (priority, fragment) = if flags & FLAG_PRIORITY != 0 {
                        (Some(payload[..5].to_vec()), &payload[5..])
                    } else {
                        (None, payload)
                    };
                    block = Some((stream, flags, priority, fragment.to_vec()));
                }
                FRAME_CONTINUATION => block.as_mut().unwrap().3.extend_from_slice(payload),
                _ => parsed.push(Parsed::Other(rest[..9 + len].to_vec())),
            }
            if matches!(frame_type, FRAME_HEADERS | FRAME_CONTINUATION)
                && flags & FLAG_END_HEADERS != 0
            {
                let (stream, flags, priority, fragment) = block.take().unwrap();
                let fields = decoder
                    .decode(&fragment)
                    .unwrap()
                    .into_iter()
                    .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
                    .collect();
                parsed.push(Parsed::Headers {
                    stream,
                    flags: flags & (FLAG_END_STREAM | FLAG_PRIORITY),
                    priority,
                    fields,
                });
            }
            rest = &rest[9 + len..];
        }
        parsed
    }

    fn authority(parsed: &Parsed) -> Option<&str> {
        match parsed {
            Parsed::Headers { fields, .. } => {
                fields.iter().find(|(n, _)| n == ":authority").map(|(_, v)| v.as_str())
            }
            Parsed::Other(_) => None,
        }
    }

    fn rewrite_all(input: &[u8]) -> Result<Vec<u8>, AuthorityError> {
        let mut out = Vec::new();
        AuthorityRewriter::new().feed(input, &mut out)?;
        Ok(out)
    }

    /// A client connection: preface, SETTINGS, two requests whose header
    /// blocks come from one client encoder (the second refers to the
    /// dynamic table), a padded + prioritised HEADERS, DATA, PING, and a
    /// header block big enough to need CONTINUATION frames.
    fn client_bytes() -> Vec<u8> {
        let mut encoder = Encoder::new();
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
        let request = |authority: &'static [u8], extra: &'static [u8]| {
            vec![
                (&b":method"[..], &b"POST"[..]),
                (b":scheme", b"http"),
                (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
                (b":authority", authority),
                (b"content-type", b"application/grpc"),
                (b"workload.spiffe.io", b"true"),
                (b"x-extra", extra),
            ]
        };
        let first = encoder.encode(request(b"/run/tessera/api.sock", b"1"));
        bytes.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &first));
        bytes.extend(frame(0x0, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]));
        let second = encoder.encode(request(b"/run/tessera/api.sock", b"2"));
        let mut padded = vec![4u8];
        padded.extend([0x80, 0, 0, 1, 15]);
        padded.extend(&second);
        padded.extend([0u8; 4]);
        bytes.extend(frame(
            FRAME_HEADERS,
            FLAG_END_HEADERS | FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            3,
            &padded,
        ));
        bytes.extend(frame(0x6, 0, 0, b"pingpong"));
        let big = vec![b'v'; 40_000];
        let third =
            encoder.encode(vec![(&b":authority"[..], &b"tmp%2Fx.sock"[..]), (b"x-big", &big)]);
        let (a, b) = third.split_at(10_000);
        bytes.extend(frame(FRAME_HEADERS, 0, 5, a));
        bytes.extend(frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 5, b));
        bytes.extend(frame(0x3, 0, 5, &[0, 0, 0, 8]));
        bytes
    }

    #[test]
    fn grpcio_path_authority_becomes_localhost() {
        let mut input = PREFACE.to_vec();
        input.extend(hex::decode(GRPCIO_HEADERS).unwrap());
        let parsed = parse_output(&rewrite_all(&input).unwrap());
        assert_eq!(parsed.len(), 1);
        assert_eq!(authority(&parsed[0]), Some("localhost"));
        let Parsed::Headers { fields, stream, .. } = &parsed[0] else { panic!("{parsed:?}") };
        assert_eq!(*stream, 1);
        assert!(fields.contains(&(":path".into(), "/SpiffeWorkloadAPI/FetchX509SVID".into())));
        assert!(fields.contains(&("workload.spiffe.io".into(), "true".into())));
    }

    #[test]
    fn every_block_is_rewritten_and_other_frames_are_untouched() {
        let input = client_bytes();
        let parsed = parse_output(&rewrite_all(&input).unwrap());
        let authorities: Vec<_> = parsed.iter().filter_map(authority).collect();
        assert_eq!(authorities, ["localhost", "localhost", "localhost"]);
        let others: Vec<&Vec<u8>> = parsed
            .iter()
            .filter_map(|p| match p {
                Parsed::Other(bytes) => Some(bytes),
                Parsed::Headers { .. } => None,
            })
            .collect();
        assert_eq!(
            others,
            [
                &frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]),
                &frame(0x0, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]),
                &frame(0x6, 0, 0, b"pingpong"),
                &frame(0x3, 0, 5, &[0, 0, 0, 8]),
            ]
        );
        // Priority and END_STREAM survive; padding is gone; the dynamic
        // table reference in the second block decoded to the right value.
        let Parsed::Headers { stream, flags, priority, fields } = &parsed[3] else {
            panic!("{parsed:?}")
        };
        assert_eq!((*stream, *flags), (3, FLAG_END_STREAM | FLAG_PRIORITY));
        assert_eq!(priority.as_deref(), Some(&[0x80, 0, 0, 1, 15][..]));
        assert!(fields.contains(&("x-extra".into(), "2".into())));
        let Parsed::Headers { fields, .. } = &parsed[5] else { panic!("{parsed:?}") };
        assert_eq!(fields[1].1.len(), 40_000);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(rewrite_all(b"GET / HTTP/1.1\r\n\r\n"), Err(AuthorityError::BadPreface)));
        let with = |frames: &[u8]| {
            let mut input = PREFACE.to_vec();
            input.extend_from_slice(frames);
            rewrite_all(&input)
        };
        // Invalid HPACK: an index far past both tables.
        assert!(matches!(
            with(&frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &[0xff, 0xff, 0x7f])),
            Err(AuthorityError::Hpack(_))
        ));
        // Padding longer than the frame.
        assert!(matches!(
            with(&frame(FRAME_HEADERS, FLAG_END_HEADERS | FLAG_PADDED, 1, &[9, 0x82])),
            Err(AuthorityError::BadPadding)
        ));
        // A DATA frame inside a header block; a stray CONTINUATION.
        let mut interrupted = frame(FRAME_HEADERS, 0, 1, &[0x82]);
        interrupted.extend(frame(0x0, 0, 1, b"x"));
        assert!(matches!(with(&interrupted), Err(AuthorityError::UnexpectedFrame { .. })));
        assert!(matches!(
            with(&frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 1, &[0x82])),
            Err(AuthorityError::UnexpectedFrame { .. })
        ));
        assert!(matches!(
            with(&frame(FRAME_HEADERS, FLAG_END_HEADERS, 0, &[0x82])),
            Err(AuthorityError::HeadersOnStreamZero)
        ));
        // A header block past the bound, announced or collected.
        let mut huge = frame(FRAME_HEADERS, 0, 1, &vec![0u8; MAX_FRAME_PAYLOAD]);
        for _ in 0..4 {
            huge.extend(frame(FRAME_CONTINUATION, 0, 1, &vec![0u8; MAX_FRAME_PAYLOAD]));
        }
        assert!(matches!(with(&huge), Err(AuthorityError::HeaderBlockTooLarge)));
        // A small block that expands past the header list bound: one
        // 4,000-byte field added to the table, then referenced 100 times.
        let mut encoder = Encoder::new();
        let value = vec![b'a'; 4000];
        let mut block = encoder.encode([(&b"x-a"[..], &value[..])]);
        let again = encoder.encode([(&b"x-a"[..], &value[..])]);
        for _ in 0..100 {
            block.extend(&again);
        }
        assert!(matches!(
            with(&frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block)),
            Err(AuthorityError::HeaderListTooLarge)
        ));
        // After an error, the connection stays failed.
        let mut rewriter = AuthorityRewriter::new();
        let mut out = Vec::new();
        assert!(rewriter.feed(b"nope", &mut out).is_err());
        assert!(matches!(rewriter.feed(PREFACE, &mut out), Err(AuthorityError::Failed)));
    }

    proptest! {
        #[test]
        fn any_read_boundaries_give_the_same_output(cuts in proptest::collection::vec(0usize..60_000, 0..40)) {
            let input = client_bytes();
            let whole = rewrite_all(&input).unwrap();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (input.len() + 1)).collect();
            cuts.push(input.len());
            cuts.sort_unstable();
            let mut rewriter = AuthorityRewriter::new();
            let mut out = Vec::new();
            let mut start = 0;
            for cut in cuts {
                rewriter.feed(&input[start..cut], &mut out).unwrap();
                start = cut;
            }
            prop_assert_eq!(out, whole);
        }

        #[test]
        fn random_bytes_never_panic(frames in proptest::collection::vec(any::<u8>(), 0..2_000)) {
            let mut input = PREFACE.to_vec();
            input.extend(frames);
            let _ = rewrite_all(&input);
        }

        #[test]
        fn random_header_blocks_never_panic(block in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut input = PREFACE.to_vec();
            input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block));
            let _ = rewrite_all(&input);
        }
    }

    #[tokio::test]
    async fn the_async_adapter_rewrites_what_it_reads() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1024);
        let input = client_bytes();
        let expected = rewrite_all(&input).unwrap();
        let writer = tokio::spawn(async move {
            client.write_all(&input).await.unwrap();
            client.shutdown().await.unwrap();
        });
        let mut adapted = RewriteAuthority::new(server);
        let mut got = Vec::new();
        adapted.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, expected);
    }
}
