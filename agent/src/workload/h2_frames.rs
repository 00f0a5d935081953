//! The few pieces of HTTP/2 framing (RFC 9113) the agent reads and writes
//! itself, below the HTTP/2 server: frame headers, HEADERS payloads, and the
//! GOAWAY a refused connection gets. Depends on nothing in the crate.

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 9;
/// HEADERS frame type.
pub const FRAME_HEADERS: u8 = 0x1;
/// CONTINUATION frame type.
pub const FRAME_CONTINUATION: u8 = 0x9;
/// END_STREAM flag.
pub const FLAG_END_STREAM: u8 = 0x1;
/// END_HEADERS flag.
pub const FLAG_END_HEADERS: u8 = 0x4;
/// PADDED flag.
pub const FLAG_PADDED: u8 = 0x8;
/// PRIORITY flag.
pub const FLAG_PRIORITY: u8 = 0x20;
/// Length of the PRIORITY fields of a HEADERS frame (dependency + weight).
pub const PRIORITY_LEN: usize = 5;
/// Largest payload of a frame we write: the default SETTINGS_MAX_FRAME_SIZE.
pub const MAX_FRAME_PAYLOAD: usize = 16_384;

/// Splits a HEADERS payload into its PRIORITY fields and its header block
/// fragment, dropping padding; `None` when the frame is too short for its
/// padding or priority fields.
pub fn split_headers_payload(
    flags: u8,
    payload: &[u8],
) -> Option<(Option<[u8; PRIORITY_LEN]>, &[u8])> {
    let mut rest = payload;
    if flags & FLAG_PADDED != 0 {
        let (&pad, after) = rest.split_first()?;
        let keep = after.len().checked_sub(usize::from(pad))?;
        rest = &after[..keep];
    }
    let mut priority = None;
    if flags & FLAG_PRIORITY != 0 {
        let fields = rest.get(..PRIORITY_LEN)?;
        let mut bytes = [0u8; PRIORITY_LEN];
        bytes.copy_from_slice(fields);
        priority = Some(bytes);
        rest = &rest[PRIORITY_LEN..];
    }
    Some((priority, rest))
}

/// Writes a header block (of `stream`) as one HEADERS frame and as many CONTINUATION
/// frames as needed, no payload over [`MAX_FRAME_PAYLOAD`].
pub fn write_header_frames(
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    encoded: &[u8],
    out: &mut Vec<u8>,
) {
    let priority_len = if priority.is_some() { PRIORITY_LEN } else { 0 };
    let first_len = encoded.len().min(MAX_FRAME_PAYLOAD - priority_len);
    let (first, mut rest) = encoded.split_at(first_len);
    let mut flags = 0;
    if end_stream {
        flags |= FLAG_END_STREAM;
    }
    if priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    write_frame_header(out, priority_len + first.len(), FRAME_HEADERS, flags, stream);
    if let Some(priority) = &priority {
        out.extend_from_slice(priority);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(rest.len().min(MAX_FRAME_PAYLOAD));
        let flags = if after.is_empty() { FLAG_END_HEADERS } else { 0 };
        write_frame_header(out, chunk.len(), FRAME_CONTINUATION, flags, stream);
        out.extend_from_slice(chunk);
        rest = after;
    }
}

/// Writes a frame header: payload length, type, flags, stream ID.
pub fn write_frame_header(out: &mut Vec<u8>, len: usize, frame_type: u8, flags: u8, stream: u32) {
    // `len` is at most MAX_FRAME_PAYLOAD (< 2^24): the top byte is zero.
    let len = (len as u32).to_be_bytes();
    out.extend_from_slice(&[len[1], len[2], len[3], frame_type, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
}

/// The first bytes the agent sends to a connection it refuses at accept:
/// its HTTP/2 SETTINGS (empty) and a GOAWAY (ENHANCE_YOUR_CALM, no stream
/// processed) whose debug data says why. Nothing the client sent is read.
pub fn goaway_frames(why: &str) -> Vec<u8> {
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    let debug = &why.as_bytes()[..why.len().min(1024)];
    let mut out = Vec::with_capacity(9 + 9 + 8 + debug.len());
    let mut frame = |kind: u8, payload: &[u8]| {
        write_frame_header(&mut out, payload.len(), kind, 0, 0);
        out.extend_from_slice(payload);
    };
    frame(SETTINGS, &[]);
    let mut goaway = Vec::with_capacity(8 + debug.len());
    goaway.extend_from_slice(&0u32.to_be_bytes()); // last stream ID
    goaway.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
    goaway.extend_from_slice(debug);
    frame(GOAWAY, &goaway);
    out
}
