//! A minimal hand-rolled HTTP/2 gRPC client for tests that must control the wire: arbitrary
//! `:authority` values, and requests held in flight.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// What a raw HTTP/2 exchange returned for one unary gRPC call.
#[derive(Debug, Default)]
pub struct RawReply {
    pub status: Option<String>,
    pub grpc_status: Option<String>,
    pub reset: bool,
    pub body: Vec<u8>,
}

/// One unary gRPC call on a raw HTTP/2 connection, with a hand-built header block so that
/// `:authority` can be anything (or absent) — exactly what kube-apiserver, grpc-java and C-core
/// put on the wire. Sent in two steps so a test can hold the request in flight.
pub struct RawCall {
    stream: UnixStream,
}

impl RawCall {
    /// Connects and sends the request headers, leaving the stream open (the body not sent).
    pub fn start(socket: &Path, authority: Option<&[u8]>, path: &str) -> RawCall {
        let mut s = UnixStream::connect(socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        let mut enc = loona_hpack::Encoder::new();
        let mut headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.as_bytes()),
        ];
        if let Some(a) = authority {
            headers.push((b":authority", a));
        }
        headers.push((b"content-type", b"application/grpc"));
        headers.push((b"te", b"trailers"));
        let block = enc.encode(headers);
        let mut out = PREFACE.to_vec();
        out.extend(frame(0x4, 0, 0, &[]));
        out.extend(frame(0x1, 0x4, 1, &block));
        s.write_all(&out).expect("write");
        RawCall { stream: s }
    }

    /// Connects and sends a request with exactly `headers` (any method, any content-type),
    /// leaving the stream open.
    pub fn start_with(socket: &Path, headers: &[(&[u8], &[u8])]) -> RawCall {
        let mut s = UnixStream::connect(socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode(headers.iter().copied());
        let mut out = PREFACE.to_vec();
        out.extend(frame(0x4, 0, 0, &[]));
        out.extend(frame(0x1, 0x4, 1, &block));
        s.write_all(&out).expect("write");
        RawCall { stream: s }
    }

    /// Ends the stream with a DATA frame holding exactly `body` (no gRPC length prefix added)
    /// and reads the reply.
    pub fn finish_raw(mut self, body: &[u8]) -> RawReply {
        self.stream
            .write_all(&frame(0x0, 0x1, 1, body))
            .expect("write");
        self.read_reply()
    }

    /// Sends the request message, ends the stream, and reads the reply.
    pub fn finish(self, message: &[u8]) -> RawReply {
        self.finish_keep(message).0
    }

    /// As [`finish`](Self::finish), keeping the connection for further observation.
    pub fn finish_keep(mut self, message: &[u8]) -> (RawReply, UnixStream) {
        let reply = self.exchange(message);
        (reply, self.stream)
    }

    fn exchange(&mut self, message: &[u8]) -> RawReply {
        let mut grpc = vec![0u8];
        grpc.extend_from_slice(&(message.len() as u32).to_be_bytes());
        grpc.extend_from_slice(message);
        self.stream
            .write_all(&frame(0x0, 0x1, 1, &grpc))
            .expect("write");
        self.read_reply()
    }

    fn read_reply(&mut self) -> RawReply {
        let mut dec = loona_hpack::Decoder::new();
        let mut reply = RawReply::default();
        read_frames(&mut self.stream, |kind, flags, stream, payload| {
            match (kind, stream) {
                (0x0, 1) => reply.body.extend_from_slice(payload),
                (0x1, 1) => {
                    for (n, v) in dec.decode(payload).expect("hpack") {
                        let v = String::from_utf8_lossy(&v).to_string();
                        match &n[..] {
                            b":status" => reply.status = Some(v),
                            b"grpc-status" => reply.grpc_status = Some(v),
                            _ => {}
                        }
                    }
                    return flags & 1 != 0;
                }
                (0x3, 1) => {
                    reply.reset = true;
                    return true;
                }
                // GOAWAY: only fatal to our stream if it was not accepted (graceful
                // shutdown announces the last stream it will still finish).
                (0x7, _) => {
                    let last = payload.get(..4).map_or(0, |b| {
                        u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff
                    });
                    if last < 1 {
                        reply.reset = true;
                        return true;
                    }
                }
                _ => {}
            }
            false
        });
        reply
    }
}

/// Reads frames from `s`, acknowledging the server's SETTINGS, and hands each other frame
/// (type, flags, stream id, payload) to `on` until it returns true or the connection ends.
pub fn read_frames(s: &mut UnixStream, mut on: impl FnMut(u8, u8, u32, &[u8]) -> bool) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while buf.len() >= 9 {
            let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let payload = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            if (kind, stream) == (0x4, 0) {
                if flags & 1 == 0 {
                    s.write_all(&frame(0x4, 1, 0, &[])).expect("ack");
                }
                continue;
            }
            if on(kind, flags, stream, &payload) {
                return;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// [`RawCall`] in one go.
pub fn raw_call(socket: &Path, authority: Option<&[u8]>, path: &str, message: &[u8]) -> RawReply {
    RawCall::start(socket, authority, path).finish(message)
}
