//! The `:authority` shim: lets clients that send a socket path as `:authority` talk to tonic.
//!
//! hyper's HTTP/2 layer (h2) resets any request whose `:authority` is not a valid URI
//! authority. Over a Unix socket, kube-apiserver before kubernetes PR 126930, k3s 1.30,
//! grpc-java and the C-core gRPC stacks (Python `grpcio` ≥ 1.57, Ruby, PHP) send exactly
//! that: the socket path, often percent-encoded. This shim sits between the socket and the
//! HTTP/2 server, reads the client-to-server byte stream frame by frame, HPACK-decodes each
//! request header block, replaces an unparseable `:authority` with `localhost`, and
//! re-encodes the block. Every header block is re-encoded through one HPACK encoder, so the
//! server's decoder state always matches what it receives. All other frames, and the whole
//! server-to-client direction, pass through untouched.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use zeroize::Zeroize;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
/// The server's SETTINGS_MAX_FRAME_SIZE (the HTTP/2 default, which localkms keeps): no
/// conforming client sends a larger frame, and the shim never emits one.
pub(super) const MAX_FRAME_LEN: usize = 16_384;
/// Largest header block the shim will assemble across HEADERS and CONTINUATION frames.
pub(super) const MAX_HEADER_BLOCK_LEN: usize = 64 * 1024;
/// Largest decoded header list (names plus values): HPACK lets a small block reference large
/// table entries many times, so the decoded size is capped separately.
pub(super) const MAX_DECODED_HEADERS_LEN: usize = 64 * 1024;
/// The HPACK dynamic table size the HTTP/2 server advertises (the protocol default); a client
/// may not ask for more.
const HPACK_TABLE_SIZE: usize = 4096;
/// The authority substituted for an invalid one, as kube-apiserver sends today.
const REPLACEMENT: &[u8] = b"localhost";

const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// At most one log line a second for connections closed for broken framing or header limits,
/// with the count since the last: a client reconnecting in a loop must not flood the log.
static BROKEN_CONNECTIONS: LogThrottle = LogThrottle::new();

/// A process-wide once-a-second log throttle with a count of what it held back.
struct LogThrottle {
    last_s: std::sync::atomic::AtomicU64,
    held: std::sync::atomic::AtomicU64,
}

impl LogThrottle {
    const fn new() -> Self {
        LogThrottle {
            last_s: std::sync::atomic::AtomicU64::new(0),
            held: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Counts one event; the count to log when a line is due this second.
    fn due(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        self.held.fetch_add(1, Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_s.load(Relaxed);
        if now > last
            && self
                .last_s
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Relaxed));
        }
        None
    }
}

/// Why the shim closed a connection: the client broke HTTP/2 framing or HPACK, which the
/// HTTP/2 server would have rejected too.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum ShimError {
    /// A header block does not decode.
    #[error("HPACK decoding failed: {0}")]
    Hpack(String),
    /// Framing rules were broken.
    #[error("malformed HTTP/2 framing: {0}")]
    Framing(&'static str),
    /// A header block grew past [`MAX_HEADER_BLOCK_LEN`], or decoded past
    /// [`MAX_DECODED_HEADERS_LEN`].
    #[error("request headers larger than {MAX_HEADER_BLOCK_LEN} bytes")]
    HeaderBlockTooLarge,
    /// A header block with more fields than any real request, or a connection past its
    /// budget of decoded fields (see `hpack_work`).
    #[error("request headers cost more HPACK work than allowed ({0})")]
    TooMuchHeaderWork(&'static str),
}

#[derive(Debug, PartialEq, Eq)]
enum Stage {
    Preface,
    Frames,
    /// Not HTTP/2 as we know it: hand the bytes over unchanged and let the server refuse them.
    Passthrough,
}

struct PendingBlock {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// Counts the HEADERS frames in a byte stream that starts at a frame boundary, across reads,
/// without copying it: how a connection that needs no rewriting is watched (its requests
/// keep the idle deadline away).
#[derive(Debug, Default)]
pub(super) struct FrameCounter {
    header: [u8; FRAME_HEADER_LEN],
    have: usize,
    skip: usize,
}

impl FrameCounter {
    /// Walks `bytes`; returns how many HEADERS frames began in them.
    pub(super) fn scan(&mut self, mut bytes: &[u8]) -> u64 {
        let mut started = 0;
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (FRAME_HEADER_LEN - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == FRAME_HEADER_LEN {
                let h = &self.header;
                self.skip = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                if h[3] == TYPE_HEADERS {
                    started += 1;
                }
                self.have = 0;
            }
        }
        started
    }
}

/// The byte-level rewriter, separate from I/O so it can be tested on its own.
pub(super) struct Rewriter {
    stage: Stage,
    input: BytesMut,
    output: BytesMut,
    pending: Option<PendingBlock>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    rewritten: u64,
    requests: u64,
    /// Header fields decoded on this connection (its budget is
    /// [`super::hpack_work::MAX_FIELDS_PER_CONNECTION`]).
    fields_decoded: u64,
    /// Header blocks are still decoded. Cleared when a connection's first request carries a
    /// valid `:authority` (grpc-go, kube-apiserver >= 1.31 send `localhost`): from then on
    /// header frames pass through untouched and are only counted, so such a client pays no
    /// HPACK work. A connection whose first authority needs rewriting keeps being decoded
    /// and re-encoded.
    inspect: bool,
}

impl Drop for Rewriter {
    fn drop(&mut self) {
        self.input.zeroize();
        self.output.zeroize();
    }
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    /// A rewriter at the start of a connection.
    pub(super) fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE_SIZE);
        Rewriter {
            stage: Stage::Preface,
            // Sized for a typical exchange up front, so growth (which leaves unwiped copies
            // in freed memory) is rare.
            input: BytesMut::with_capacity(32 * 1024),
            output: BytesMut::with_capacity(32 * 1024),
            pending: None,
            decoder,
            encoder: loona_hpack::Encoder::new(),
            rewritten: 0,
            requests: 0,
            fields_decoded: 0,
            inspect: true,
        }
    }

    /// How many request header blocks this connection has sent.
    pub(super) fn requests(&self) -> u64 {
        self.requests
    }

    /// Once nothing on this connection needs rewriting and every byte handed in has been
    /// handed out: the bytes of a partial frame still held, moved to the output, and a
    /// counter positioned after them, so the caller can read the socket straight into the
    /// server's buffer from now on.
    pub(super) fn start_zero_copy(&mut self) -> Option<FrameCounter> {
        if self.inspect || self.stage != Stage::Frames || self.pending.is_some() {
            return None;
        }
        if !self.output.is_empty() {
            return None;
        }
        let rest = self.input.split();
        let mut counter = FrameCounter::default();
        self.requests += counter.scan(&rest);
        self.output.extend_from_slice(&rest);
        Some(counter)
    }

    /// Requests counted outside the rewriter (zero-copy mode).
    pub(super) fn add_requests(&mut self, n: u64) {
        self.requests += n;
    }

    /// How many `:authority` values this connection has had replaced.
    #[cfg(test)]
    pub(super) fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// Adds bytes read from the client and processes every complete frame.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Result<(), ShimError> {
        if self.stage == Stage::Passthrough {
            self.output.extend_from_slice(bytes);
            return Ok(());
        }
        self.input.extend_from_slice(bytes);
        self.process()
    }

    /// Bytes ready for the HTTP/2 server.
    pub(super) fn output(&mut self) -> &mut BytesMut {
        &mut self.output
    }

    /// At end of input, hands over any incomplete frame unchanged (the server will see the
    /// truncation and close the connection).
    pub(super) fn finish(&mut self) {
        let rest = self.input.split();
        self.output.extend_from_slice(&rest);
    }

    fn passthrough(&mut self) {
        self.stage = Stage::Passthrough;
        let rest = self.input.split();
        self.output.extend_from_slice(&rest);
    }

    fn process(&mut self) -> Result<(), ShimError> {
        if self.stage == Stage::Preface {
            let n = self.input.len().min(PREFACE.len());
            if self.input[..n] != PREFACE[..n] {
                self.passthrough();
                return Ok(());
            }
            if n < PREFACE.len() {
                return Ok(());
            }
            let preface = self.input.split_to(PREFACE.len());
            self.output.extend_from_slice(&preface);
            self.stage = Stage::Frames;
        }
        while self.stage == Stage::Frames && self.input.len() >= FRAME_HEADER_LEN {
            let len = usize::from(self.input[0]) << 16
                | usize::from(self.input[1]) << 8
                | usize::from(self.input[2]);
            if len > MAX_FRAME_LEN {
                // The server refuses this with FRAME_SIZE_ERROR; do not buffer it.
                if self.pending.is_some() {
                    return Err(ShimError::Framing("oversized frame inside a header block"));
                }
                self.passthrough();
                return Ok(());
            }
            if self.input.len() < FRAME_HEADER_LEN + len {
                break;
            }
            let mut frame = self.input.split_to(FRAME_HEADER_LEN + len);
            let kind = frame[3];
            let flags = frame[4];
            let stream_id =
                u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            frame.advance(FRAME_HEADER_LEN);
            match kind {
                TYPE_HEADERS | TYPE_CONTINUATION if !self.inspect => {
                    if kind == TYPE_HEADERS {
                        self.requests += 1;
                    }
                    put_frame_header(&mut self.output, frame.len(), kind, flags, stream_id);
                    self.output.extend_from_slice(&frame);
                }
                TYPE_HEADERS => self.on_headers(flags, stream_id, &frame)?,
                TYPE_CONTINUATION => self.on_continuation(flags, stream_id, &frame)?,
                _ if self.pending.is_some() => {
                    return Err(ShimError::Framing(
                        "frame interleaved inside a header block",
                    ))
                }
                _ => {
                    put_frame_header(&mut self.output, frame.len(), kind, flags, stream_id);
                    self.output.extend_from_slice(&frame);
                }
            }
            // DATA frames carry plaintext DEKs: wipe this copy once it is passed on.
            frame.zeroize();
        }
        Ok(())
    }

    fn on_headers(&mut self, flags: u8, stream_id: u32, payload: &[u8]) -> Result<(), ShimError> {
        if self.pending.is_some() {
            return Err(ShimError::Framing("HEADERS inside another header block"));
        }
        let mut body = payload;
        let mut pad = 0usize;
        if flags & FLAG_PADDED != 0 {
            let (&p, rest) = body
                .split_first()
                .ok_or(ShimError::Framing("padded HEADERS without a pad length"))?;
            pad = usize::from(p);
            body = rest;
        }
        let priority = if flags & FLAG_PRIORITY != 0 {
            if body.len() < 5 {
                return Err(ShimError::Framing("HEADERS priority field truncated"));
            }
            let (p, rest) = body.split_at(5);
            body = rest;
            let mut fields = [0u8; 5];
            fields.copy_from_slice(p);
            Some(fields)
        } else {
            None
        };
        if pad > body.len() {
            return Err(ShimError::Framing("HEADERS padding longer than the frame"));
        }
        let fragment = &body[..body.len() - pad];
        self.pending = Some(PendingBlock {
            stream_id,
            end_stream: flags & FLAG_END_STREAM != 0,
            priority,
            fragment: fragment.to_vec(),
        });
        if flags & FLAG_END_HEADERS != 0 {
            self.finish_block()?;
        }
        Ok(())
    }

    fn on_continuation(
        &mut self,
        flags: u8,
        stream_id: u32,
        payload: &[u8],
    ) -> Result<(), ShimError> {
        let pending = self
            .pending
            .as_mut()
            .filter(|p| p.stream_id == stream_id)
            .ok_or(ShimError::Framing(
                "CONTINUATION without a matching HEADERS",
            ))?;
        if pending.fragment.len() + payload.len() > MAX_HEADER_BLOCK_LEN {
            return Err(ShimError::HeaderBlockTooLarge);
        }
        pending.fragment.extend_from_slice(payload);
        if flags & FLAG_END_HEADERS != 0 {
            self.finish_block()?;
        }
        Ok(())
    }

    fn finish_block(&mut self) -> Result<(), ShimError> {
        let Some(block) = self.pending.take() else {
            return Ok(());
        };
        self.requests += 1;
        // The decoder's cost is per string, not per byte: check it before decoding, and count
        // it against the connection.
        use super::hpack_work::{cost, MAX_FIELDS_PER_BLOCK, MAX_FIELDS_PER_CONNECTION};
        let work = cost(&block.fragment, MAX_FIELDS_PER_BLOCK);
        if work.fields > MAX_FIELDS_PER_BLOCK {
            return Err(ShimError::TooMuchHeaderWork(
                "more than 256 header fields in one block",
            ));
        }
        self.fields_decoded = self.fields_decoded.saturating_add(work.fields as u64);
        if self.fields_decoded > MAX_FIELDS_PER_CONNECTION {
            return Err(ShimError::TooMuchHeaderWork(
                "this connection's budget of rewritten header fields is spent; reconnect",
            ));
        }
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut decoded = 0usize;
        let mut too_large = false;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                decoded = decoded.saturating_add(name.len() + value.len());
                if decoded > MAX_DECODED_HEADERS_LEN {
                    too_large = true;
                } else {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| ShimError::Hpack(format!("{e:?}")))?;
        if too_large {
            return Err(ShimError::HeaderBlockTooLarge);
        }
        for (name, value) in headers.iter_mut() {
            if name.as_slice() == b":authority" && !is_valid_authority(value) {
                *value = REPLACEMENT.to_vec();
                self.rewritten += 1;
            }
        }
        if self.rewritten == 0 {
            // Nothing was ever re-encoded on this connection, so the server's HPACK state is
            // the client's: hand the block over as it came, and stop decoding.
            self.inspect = false;
            self.emit(&block, &block.fragment);
            return Ok(());
        }
        let encoded = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        self.emit(&block, &encoded);
        Ok(())
    }

    fn emit(&mut self, block: &PendingBlock, encoded: &[u8]) {
        let prio_len = if block.priority.is_some() { 5 } else { 0 };
        let first_len = encoded.len().min(MAX_FRAME_LEN - prio_len);
        let (first, mut rest) = encoded.split_at(first_len);
        let mut flags = 0;
        if block.end_stream {
            flags |= FLAG_END_STREAM;
        }
        if block.priority.is_some() {
            flags |= FLAG_PRIORITY;
        }
        if rest.is_empty() {
            flags |= FLAG_END_HEADERS;
        }
        put_frame_header(
            &mut self.output,
            first.len() + prio_len,
            TYPE_HEADERS,
            flags,
            block.stream_id,
        );
        if let Some(p) = block.priority {
            self.output.extend_from_slice(&p);
        }
        self.output.extend_from_slice(first);
        while !rest.is_empty() {
            let n = rest.len().min(MAX_FRAME_LEN);
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
            put_frame_header(
                &mut self.output,
                chunk.len(),
                TYPE_CONTINUATION,
                flags,
                block.stream_id,
            );
            self.output.extend_from_slice(chunk);
        }
    }
}

/// What h2 accepts: exactly what `http::uri::Authority` parses.
fn is_valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

fn put_frame_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream_id: u32) {
    // Lengths here never exceed MAX_FRAME_LEN, which fits in 24 bits.
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream_id & 0x7fff_ffff);
}

/// Shared by the accept loop, one connection and the request guard for the connection's whole
/// life: lets the accept loop, when every connection slot is taken, evict a connection that
/// is not doing anything (one still in its handshake, or one idle with no request open), so
/// idle connections cannot lock a real client out.
pub(super) struct ConnTicket {
    /// When the connection was accepted: younger ones are not evicted, as the server may not
    /// have read a preface the client already sent.
    pub accepted: std::time::Instant,
    /// Who is on the other end, for the eviction log line.
    pub peer: Option<super::incoming::PeerInfo>,
    /// The HTTP/2 preface has arrived.
    pub handshaken: std::sync::atomic::AtomicBool,
    /// The connection is gone.
    pub closed: std::sync::atomic::AtomicBool,
    /// Requests open on the connection (kept by the request guard).
    pub active: std::sync::atomic::AtomicUsize,
    /// When the connection last became idle, in ms after `accepted`.
    idle_since_ms: std::sync::atomic::AtomicU64,
    /// Notified to evict.
    pub evict: std::sync::Arc<tokio::sync::Notify>,
    /// Set (before the notification) when the accept loop evicts the connection: the
    /// connection checks this flag on every read and polls the notification only once, to
    /// register for the wake-up.
    pub evicted: std::sync::atomic::AtomicBool,
}

impl ConnTicket {
    /// A ticket for a connection from `peer` accepted now.
    pub(super) fn new(peer: Option<super::incoming::PeerInfo>) -> Self {
        ConnTicket {
            accepted: std::time::Instant::now(),
            peer,
            handshaken: Default::default(),
            closed: Default::default(),
            active: Default::default(),
            idle_since_ms: Default::default(),
            evict: Default::default(),
            evicted: Default::default(),
        }
    }

    /// Marks the connection idle from now on (handshake done, or its last request finished).
    pub(super) fn mark_idle_now(&self) {
        let ms = u64::try_from(self.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.idle_since_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long the connection has had nothing to do: `None` while it is in its handshake or
    /// has a request open.
    pub(super) fn idle_for(&self) -> Option<std::time::Duration> {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.handshaken.load(Relaxed) || self.active.load(Relaxed) > 0 {
            return None;
        }
        let since = std::time::Duration::from_millis(self.idle_since_ms.load(Relaxed));
        Some(self.accepted.elapsed().saturating_sub(since))
    }
}

type Eviction = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A connection whose client-to-server bytes go through a [`Rewriter`].
pub(super) struct AuthorityShim<S> {
    inner: S,
    rewriter: Rewriter,
    eof: bool,
    /// When to give up on the client: the handshake deadline until the HTTP/2 preface has
    /// arrived, then `idle` after the last request.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// How long a connection may go without a request.
    idle: std::time::Duration,
    /// Requests seen when the idle deadline was last reset.
    seen_requests: u64,
    /// Whether the handshake is over (the deadline is the idle one).
    handshaken: bool,
    /// The connection slot this connection occupies; freed when it closes.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The accept loop's handle on this connection, and its eviction signal.
    ticket: Option<(std::sync::Arc<ConnTicket>, Eviction)>,
    /// Set once the rewriter has nothing left to do: reads then go straight into the
    /// server's buffer and frames are only counted.
    zero_copy: Option<FrameCounter>,
    /// Requests arrived since the idle deadline was last set.
    active_since_armed: bool,
    /// The eviction notification has been polled once (so it will wake this connection).
    evict_registered: bool,
}

impl<S> AuthorityShim<S> {
    /// Wraps a freshly accepted connection that must send its HTTP/2 preface within
    /// `handshake_timeout` and is closed after `idle_timeout` without a request, holding
    /// `slot` until it closes.
    pub(super) fn new(
        inner: S,
        handshake_timeout: std::time::Duration,
        idle_timeout: std::time::Duration,
        slot: tokio::sync::OwnedSemaphorePermit,
        ticket: std::sync::Arc<ConnTicket>,
    ) -> Self {
        let evict: Eviction = Box::pin(std::sync::Arc::clone(&ticket.evict).notified_owned());
        AuthorityShim {
            ticket: Some((ticket, evict)),
            inner,
            rewriter: Rewriter::new(),
            eof: false,
            deadline: Some(Box::pin(tokio::time::sleep(handshake_timeout))),
            idle: idle_timeout,
            seen_requests: 0,
            handshaken: false,
            _slot: Some(slot),
            zero_copy: None,
            active_since_armed: false,
            evict_registered: false,
        }
    }

    /// The wrapped connection.
    pub(super) fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The accept loop's ticket for this connection, if it has one.
    pub(super) fn ticket(&self) -> Option<&std::sync::Arc<ConnTicket>> {
        self.ticket.as_ref().map(|(t, _)| t)
    }
}

impl<S> Drop for AuthorityShim<S> {
    fn drop(&mut self) {
        if let Some((ticket, _)) = &self.ticket {
            ticket
                .closed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityShim<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some((ticket, evict)) = this.ticket.as_mut() {
            if this.rewriter.stage != Stage::Preface
                && !ticket.handshaken.load(std::sync::atomic::Ordering::Relaxed)
            {
                ticket.mark_idle_now();
                ticket
                    .handshaken
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let evicted = ticket.evicted.load(std::sync::atomic::Ordering::Acquire)
                || (!this.evict_registered && evict.as_mut().poll(cx).is_ready());
            this.evict_registered = true;
            if evicted {
                // Polled once more, the finished signal would panic: drop it with the ticket.
                ticket
                    .closed
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                this.ticket = None;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "evicted: all connection slots taken and this connection was idle",
                )));
            }
        }
        if let Some(deadline) = this.deadline.as_mut() {
            let requests = this.rewriter.requests();
            let handshaken = this.rewriter.stage != Stage::Preface;
            // Far enough in the future to mean "never" when the idle limit is unbounded.
            let idle_deadline = |idle| {
                tokio::time::Instant::now()
                    .checked_add(idle)
                    .unwrap_or_else(|| {
                        tokio::time::Instant::now() + std::time::Duration::from_secs(86_400 * 365)
                    })
            };
            if handshaken && !this.handshaken {
                this.handshaken = true;
                this.seen_requests = requests;
                deadline.as_mut().reset(idle_deadline(this.idle));
            } else if requests != this.seen_requests {
                // No timer work per request: the deadline is moved when it comes due, so a
                // quiet connection closes between one and two --idle-timeout after its last
                // request.
                this.seen_requests = requests;
                this.active_since_armed = true;
            }
            // Polled every time, so the timer can wake this connection up.
            if deadline.as_mut().poll(cx).is_ready() && this.active_since_armed {
                this.active_since_armed = false;
                deadline.as_mut().reset(idle_deadline(this.idle));
            }
            if deadline.as_mut().poll(cx).is_ready() {
                let why = if this.handshaken {
                    "connection idle for longer than --idle-timeout; closing it"
                } else {
                    "client did not send the HTTP/2 preface in time"
                };
                tracing::debug!("{why}");
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)));
            }
        }
        loop {
            let out = this.rewriter.output();
            if !out.is_empty() {
                let n = out.len().min(buf.remaining());
                buf.put_slice(&out[..n]);
                out[..n].zeroize();
                out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.zero_copy.is_none() {
                this.zero_copy = this.rewriter.start_zero_copy();
                if this.zero_copy.is_some() {
                    // A partial frame may have been moved to the output: serve it first.
                    continue;
                }
            }
            if let Some(counter) = this.zero_copy.as_mut() {
                let before = buf.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                // The idle deadline sees these at the top of the next poll, before it is
                // checked.
                let started = counter.scan(&buf.filled()[before..]);
                this.rewriter.add_requests(started);
                return Poll::Ready(Ok(()));
            }
            let mut scratch = [0u8; 8192];
            let mut read = ReadBuf::new(&mut scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let filled = read.filled().len();
            let result = if filled == 0 {
                this.eof = true;
                this.rewriter.finish();
                Ok(())
            } else {
                this.rewriter.feed(&scratch[..filled])
            };
            // Request bodies carry plaintext DEKs: do not leave them on the stack.
            scratch[..filled].zeroize();
            if let Err(e) = result {
                if let Some(closed) = BROKEN_CONNECTIONS.due() {
                    let (uid, pid) = this
                        .ticket
                        .as_ref()
                        .and_then(|(t, _)| t.peer)
                        .map_or((None, None), |p| (Some(p.uid), p.pid));
                    tracing::warn!(error = %e, uid, pid, closed, "closing a connection that broke HTTP/2 framing or its header limits (closed counts those since the last such message)");
                }
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityShim<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_frame(
        encoder: &mut loona_hpack::Encoder<'_>,
        authority: Option<&[u8]>,
        flags: u8,
    ) -> Vec<u8> {
        let mut hs: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/v2.KeyManagementService/Status"),
        ];
        if let Some(a) = authority {
            hs.push((b":authority", a));
        }
        hs.push((b"content-type", b"application/grpc"));
        hs.push((b"te", b"trailers"));
        let block = encoder.encode(hs);
        let mut out = BytesMut::new();
        put_frame_header(
            &mut out,
            block.len(),
            TYPE_HEADERS,
            flags | FLAG_END_HEADERS,
            1,
        );
        out.extend_from_slice(&block);
        out.to_vec()
    }

    fn decode_output(out: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        assert_eq!(&out[..24], PREFACE);
        let mut dec = loona_hpack::Decoder::new();
        let mut rest = &out[24..];
        let mut all = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let kind = rest[3];
            let payload = &rest[9..9 + len];
            if kind == TYPE_HEADERS {
                dec.decode_with_cb(payload, |n, v| all.push((n.into_owned(), v.into_owned())))
                    .expect("decodes");
            }
            rest = &rest[9 + len..];
        }
        all
    }

    fn authority_after(authority: Option<&[u8]>) -> Option<Vec<u8>> {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(&mut enc, authority, 0));
        let mut rw = Rewriter::new();
        // Byte by byte: frames split across reads must still be handled.
        for b in &input {
            rw.feed(std::slice::from_ref(b)).expect("feed");
        }
        let out = rw.output().to_vec();
        let headers = decode_output(&out);
        assert!(headers
            .iter()
            .any(|(n, v)| n == b":path" && v == b"/v2.KeyManagementService/Status"));
        headers
            .into_iter()
            .find(|(n, _)| n == b":authority")
            .map(|(_, v)| v)
    }

    #[test]
    fn invalid_authorities_become_localhost() {
        for bad in [
            &b"/var/run/localkms/kms.sock"[..],
            b"%2Fvar%2Frun%2Fkms.sock",
            b"",
        ] {
            let got = authority_after(Some(bad));
            if is_valid_authority(bad) {
                assert_eq!(got.as_deref(), Some(bad));
            } else {
                assert_eq!(
                    got.as_deref(),
                    Some(&b"localhost"[..]),
                    "for {:?}",
                    String::from_utf8_lossy(bad)
                );
            }
        }
        assert!(!is_valid_authority(b"/var/run/localkms/kms.sock"));
    }

    #[test]
    fn valid_and_missing_authorities_are_kept() {
        assert_eq!(
            authority_after(Some(b"localhost")).as_deref(),
            Some(&b"localhost"[..])
        );
        assert_eq!(
            authority_after(Some(b"kms.local:80")).as_deref(),
            Some(&b"kms.local:80"[..])
        );
        assert_eq!(authority_after(None), None);
    }

    #[test]
    fn other_frames_pass_through_unchanged_and_dynamic_table_stays_in_sync() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        // SETTINGS, then two requests whose second header block relies on the dynamic table.
        let mut settings = BytesMut::new();
        put_frame_header(&mut settings, 6, 0x4, 0, 0);
        settings.extend_from_slice(&[0, 3, 0, 0, 0, 100]);
        input.extend_from_slice(&settings);
        input.extend(headers_frame(&mut enc, Some(b"/x.sock"), 0));
        let mut data = BytesMut::new();
        put_frame_header(&mut data, 5, 0x0, FLAG_END_STREAM, 1);
        data.extend_from_slice(&[0, 0, 0, 0, 0]);
        input.extend_from_slice(&data);
        input.extend(headers_frame(&mut enc, Some(b"/x.sock"), FLAG_END_STREAM));
        let mut rw = Rewriter::new();
        rw.feed(&input).expect("feed");
        let out = rw.output().to_vec();
        assert!(out.windows(settings.len()).any(|w| w == &settings[..]));
        assert!(out.windows(data.len()).any(|w| w == &data[..]));
        let headers = decode_output(&out);
        let authorities: Vec<_> = headers.iter().filter(|(n, _)| n == b":authority").collect();
        assert_eq!(authorities.len(), 2);
        assert!(authorities.iter().all(|(_, v)| v == b"localhost"));
        assert_eq!(rw.rewritten(), 2);
    }

    #[test]
    fn a_connection_that_starts_with_a_valid_authority_is_passed_through_byte_for_byte() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(&mut enc, Some(b"localhost"), 0));
        input.extend(headers_frame(&mut enc, Some(b"localhost"), FLAG_END_STREAM));
        // A later invalid authority is no longer looked at (h2 resets that request, as it
        // would without the shim); real clients keep one authority per connection.
        input.extend(headers_frame(&mut enc, Some(b"/x.sock"), FLAG_END_STREAM));
        let mut rw = Rewriter::new();
        rw.feed(&input).expect("feed");
        assert_eq!(rw.output().to_vec(), input, "untouched");
        assert_eq!(rw.requests(), 3, "still counted, for the idle timeout");
        assert_eq!(rw.rewritten(), 0);
    }

    #[test]
    fn the_frame_counter_counts_headers_across_any_split() {
        let mut enc = loona_hpack::Encoder::new();
        let mut stream = Vec::new();
        stream.extend(headers_frame(&mut enc, Some(b"localhost"), 0));
        let mut data = BytesMut::new();
        put_frame_header(&mut data, 5, 0x0, FLAG_END_STREAM, 1);
        data.extend_from_slice(&[0, 0, 0, 0, 1]);
        stream.extend_from_slice(&data);
        stream.extend(headers_frame(&mut enc, Some(b"localhost"), FLAG_END_STREAM));
        for split in 1..stream.len() {
            let mut c = FrameCounter::default();
            let n = c.scan(&stream[..split]) + c.scan(&stream[split..]);
            assert_eq!(n, 2, "split at {split}");
        }
        let mut c = FrameCounter::default();
        assert_eq!(stream.iter().map(|b| c.scan(&[*b])).sum::<u64>(), 2);
    }

    #[test]
    fn continuation_and_padding_are_handled() {
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode(vec![
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"/p.sock"),
            (b":path", b"/v2.KeyManagementService/Status"),
        ]);
        let (a, b) = block.split_at(block.len() / 2);
        let mut input = PREFACE.to_vec();
        let mut f = BytesMut::new();
        // HEADERS: padded (3 bytes) with priority, no END_HEADERS.
        put_frame_header(
            &mut f,
            1 + 5 + a.len() + 3,
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY,
            3,
        );
        f.put_u8(3);
        f.extend_from_slice(&[0, 0, 0, 0, 15]);
        f.extend_from_slice(a);
        f.extend_from_slice(&[0, 0, 0]);
        put_frame_header(&mut f, b.len(), TYPE_CONTINUATION, FLAG_END_HEADERS, 3);
        f.extend_from_slice(b);
        input.extend_from_slice(&f);
        let mut rw = Rewriter::new();
        rw.feed(&input).expect("feed");
        let out = rw.output().to_vec();
        // One HEADERS frame out, priority kept, padding dropped.
        assert_eq!(out[24 + 3], TYPE_HEADERS);
        assert_eq!(out[24 + 4], FLAG_PRIORITY | FLAG_END_HEADERS);
        let mut dec = loona_hpack::Decoder::new();
        let len = usize::from(out[24 + 1]) << 8 | usize::from(out[24 + 2]);
        let got = dec.decode(&out[24 + 9 + 5..24 + 9 + len]).expect("decode");
        assert!(got
            .iter()
            .any(|(n, v)| n == b":authority" && v == b"localhost"));
    }

    #[test]
    fn hpack_amplification_and_oversized_tables_are_refused() {
        // One 4000-byte literal added to the dynamic table, then referenced thousands of times.
        let mut block = vec![0x40, 0x01, b'x'];
        block.push(0x7f);
        let mut n = 4000 - 127;
        while n >= 128 {
            block.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        block.push(n as u8);
        block.extend(std::iter::repeat_n(b'y', 4000));
        // Index 62, the entry just added: 250 references (under the field cap) decode to 1 MB.
        block.extend(std::iter::repeat_n(0xbe, 250));
        let mut input = PREFACE.to_vec();
        let mut f = BytesMut::new();
        put_frame_header(&mut f, block.len().min(MAX_FRAME_LEN), TYPE_HEADERS, 0, 1);
        let first = block.len().min(MAX_FRAME_LEN);
        f.extend_from_slice(&block[..first]);
        if first < block.len() {
            put_frame_header(
                &mut f,
                block.len() - first,
                TYPE_CONTINUATION,
                FLAG_END_HEADERS,
                1,
            );
            f.extend_from_slice(&block[first..]);
        } else {
            f[4] |= FLAG_END_HEADERS;
        }
        input.extend_from_slice(&f);
        let mut rw = Rewriter::new();
        assert_eq!(rw.feed(&input), Err(ShimError::HeaderBlockTooLarge));

        // A dynamic table size update beyond what the server advertised.
        let mut rw = Rewriter::new();
        let mut input = PREFACE.to_vec();
        let mut f = BytesMut::new();
        let update = [0x3f, 0xe1, 0xff, 0x03]; // size update to 65536
        put_frame_header(&mut f, update.len() + 1, TYPE_HEADERS, FLAG_END_HEADERS, 1);
        f.extend_from_slice(&update);
        f.put_u8(0x82);
        input.extend_from_slice(&f);
        assert!(matches!(rw.feed(&input), Err(ShimError::Hpack(_))));
    }

    /// One header block per stream, with `fields` (each a literal, new name, Huffman-coded).
    fn block_frames(blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut input = PREFACE.to_vec();
        for (i, block) in blocks.iter().enumerate() {
            let mut f = BytesMut::new();
            put_frame_header(
                &mut f,
                block.len(),
                TYPE_HEADERS,
                FLAG_END_HEADERS,
                1 + 2 * i as u32,
            );
            f.extend_from_slice(block);
            input.extend_from_slice(&f);
        }
        input
    }

    #[test]
    fn the_broken_connection_log_is_throttled_with_a_count() {
        let t = LogThrottle::new();
        assert_eq!(t.due(), Some(1), "the first is logged");
        let held: Vec<_> = (0..1000).filter_map(|_| t.due()).collect();
        assert!(
            held.len() <= 1,
            "at most one more line within a second: {held:?}"
        );
    }

    #[test]
    fn header_work_is_capped_per_block_and_per_connection() {
        let mut enc = loona_hpack::Encoder::new();
        // A first request that needs rewriting keeps the connection on the decoding path.
        let first = headers_frame(&mut enc, Some(b"/var/run/kms.sock"), 0);
        let mut input = PREFACE.to_vec();
        input.extend(&first);
        // The CPU sink: 64 KiB of empty Huffman-coded names and values.
        let bomb = [0x00u8, 0x80, 0x80].repeat(16_000);
        let mut f = BytesMut::new();
        let chunks: Vec<&[u8]> = bomb.chunks(MAX_FRAME_LEN).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let kind = if i == 0 {
                TYPE_HEADERS
            } else {
                TYPE_CONTINUATION
            };
            let flags = if i + 1 == chunks.len() {
                FLAG_END_HEADERS
            } else {
                0
            };
            put_frame_header(&mut f, chunk.len(), kind, flags, 3);
            f.extend_from_slice(chunk);
        }
        input.extend_from_slice(&f);
        let mut rw = Rewriter::new();
        assert!(matches!(
            rw.feed(&input),
            Err(ShimError::TooMuchHeaderWork(_))
        ));
        assert_eq!(rw.rewritten(), 1, "the first request was rewritten");

        // Blocks at the per-block cap pass until the connection's budget is spent.
        let field = [0x00u8, 0x01, b'a', 0x01, b'b']; // one field: literal name a, value b
        let full = field.repeat(super::super::hpack_work::MAX_FIELDS_PER_BLOCK);
        let per_block = super::super::hpack_work::MAX_FIELDS_PER_BLOCK as u64;
        let allowed = super::super::hpack_work::MAX_FIELDS_PER_CONNECTION / per_block;
        let mut rw = Rewriter::new();
        rw.feed(&block_frames(&[enc_first()])).expect("first");
        let mut result = Ok(());
        let mut fed = 0u64;
        while result.is_ok() && fed <= allowed + 1 {
            let mut f = BytesMut::new();
            put_frame_header(
                &mut f,
                full.len(),
                TYPE_HEADERS,
                FLAG_END_HEADERS,
                5 + 2 * fed as u32,
            );
            f.extend_from_slice(&full);
            result = rw.feed(&f);
            rw.output().clear();
            fed += 1;
        }
        assert!(
            matches!(result, Err(ShimError::TooMuchHeaderWork(_))),
            "{result:?}"
        );
        assert!(
            fed > allowed - 2,
            "the budget allows about {allowed} full blocks, got {fed}"
        );
    }

    fn enc_first() -> Vec<u8> {
        let mut enc = loona_hpack::Encoder::new();
        enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"/var/run/kms.sock"),
        ])
    }

    proptest::proptest! {
        /// A rewritten header block decodes to the same header list apart from `:authority`,
        /// over a whole connection (the re-encoder's dynamic table stays in step).
        #[test]
        fn a_rewritten_block_keeps_every_other_header(
            requests in proptest::collection::vec(
                proptest::collection::vec(("[a-z-]{1,12}", "[ -~]{0,40}"), 0..12),
                1..6,
            ),
            authority in "(/[a-z]{1,10}){1,3}\\.sock",
        ) {
            let mut enc = loona_hpack::Encoder::new();
            let mut input = PREFACE.to_vec();
            let mut expected = Vec::new();
            for (i, extra) in requests.iter().enumerate() {
                let mut hs: Vec<(Vec<u8>, Vec<u8>)> = vec![
                    (b":method".to_vec(), b"POST".to_vec()),
                    (b":authority".to_vec(), authority.clone().into_bytes()),
                ];
                hs.extend(extra.iter().map(|(n, v)| (n.clone().into_bytes(), v.clone().into_bytes())));
                let block = enc.encode(hs.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
                let mut f = BytesMut::new();
                put_frame_header(&mut f, block.len(), TYPE_HEADERS, FLAG_END_HEADERS, 1 + 2 * i as u32);
                f.extend_from_slice(&block);
                input.extend_from_slice(&f);
                for (n, v) in hs {
                    let v = if n == b":authority" { REPLACEMENT.to_vec() } else { v };
                    expected.push((n, v));
                }
            }
            let mut rw = Rewriter::new();
            rw.feed(&input).expect("feed");
            let out = rw.output().to_vec();
            proptest::prop_assert_eq!(decode_output(&out), expected);
        }
    }

    #[test]
    fn broken_input_is_refused_or_passed_through() {
        // Not HTTP/2: passed through for the server to refuse.
        let mut rw = Rewriter::new();
        rw.feed(b"GET / HTTP/1.1\r\n\r\n").expect("feed");
        assert_eq!(&rw.output()[..], b"GET / HTTP/1.1\r\n\r\n");
        // CONTINUATION without HEADERS.
        let mut rw = Rewriter::new();
        let mut input = PREFACE.to_vec();
        let mut f = BytesMut::new();
        put_frame_header(&mut f, 1, TYPE_CONTINUATION, FLAG_END_HEADERS, 1);
        f.put_u8(0x82);
        input.extend_from_slice(&f);
        assert!(rw.feed(&input).is_err());
        // Garbage HPACK.
        let mut rw = Rewriter::new();
        let mut input = PREFACE.to_vec();
        let mut f = BytesMut::new();
        put_frame_header(&mut f, 2, TYPE_HEADERS, FLAG_END_HEADERS, 1);
        f.extend_from_slice(&[0xff, 0xff]);
        input.extend_from_slice(&f);
        assert!(matches!(rw.feed(&input), Err(ShimError::Hpack(_))));
    }
}
