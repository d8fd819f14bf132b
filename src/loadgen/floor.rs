//! `chorus loadgen floor`: the machine's floor for forwarding audio to viewers, with no chorus
//! logic: per packet, a 100-byte Opus-like payload behind a 12-byte RTP header, sealed with
//! AES-128-GCM as SRTP does (RFC 7714: the header as AAD, a 12-byte IV from the SSRC, ROC and
//! sequence number XOR a per-destination salt, one key per destination), sent with `sendmmsg`
//! in batches to many loopback sockets, which a second thread drains with `recvmmsg`.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use serde_json::{json, Value};

use crate::net::poll::Epoll;
use crate::net::recv::{RecvBatch, SLOT_BYTES};
use crate::net::send::SlotBatch;
use crate::net::sockopt::{raise_nofile, set_buffers, udp_socket};

pub(crate) const HEADER: usize = 12;
/// Bytes of the AES-GCM tag after each sealed payload.
pub const TAG: usize = 16;

/// What a floor run sends (`chorus loadgen floor`'s flags).
#[derive(Debug, Clone)]
pub struct FloorOptions {
    /// Packets to seal and send.
    pub packets: u64,
    /// Destination sockets (round robin), each with its own key.
    pub viewers: usize,
    /// Packets per `sendmmsg`.
    pub batch: usize,
    /// Payload bytes per packet.
    pub payload: usize,
}

impl Default for FloorOptions {
    fn default() -> Self {
        FloorOptions {
            packets: 1_000_000,
            viewers: 1000,
            batch: 32,
            payload: 100,
        }
    }
}

/// One destination's SRTP-like context.
struct Dest {
    addr: SocketAddr,
    key: LessSafeKey,
    salt: [u8; 12],
    ssrc: u32,
    /// Packets sent to it (the extended sequence number).
    index: u64,
}

/// RFC 7714 section 8.1: IV = (0x0000 || SSRC || ROC || SEQ) XOR salt.
pub(crate) fn srtp_gcm_iv(salt: &[u8; 12], ssrc: u32, index: u64) -> [u8; 12] {
    let mut iv = [0u8; 12];
    iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
    iv[6..10].copy_from_slice(&((index >> 16) as u32).to_be_bytes());
    iv[10..12].copy_from_slice(&(index as u16).to_be_bytes());
    for (b, s) in iv.iter_mut().zip(salt) {
        *b ^= s;
    }
    iv
}

/// Writes one SRTP packet for `d` into `out` (header, payload, tag); returns its length.
fn seal(d: &mut Dest, payload: &[u8], out: &mut [u8]) -> usize {
    let seq = d.index as u16;
    let ts = (d.index as u32).wrapping_mul(960);
    out[0] = 0x80;
    out[1] = 111;
    out[2..4].copy_from_slice(&seq.to_be_bytes());
    out[4..8].copy_from_slice(&ts.to_be_bytes());
    out[8..12].copy_from_slice(&d.ssrc.to_be_bytes());
    let n = HEADER + payload.len();
    out[HEADER..n].copy_from_slice(payload);
    let iv = srtp_gcm_iv(&d.salt, d.ssrc, d.index);
    d.index += 1;
    let (hdr, body) = out[..n].split_at_mut(HEADER);
    let tag = d
        .key
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(iv), Aad::from(&hdr[..]), body)
        .expect("AES-GCM seals a small packet");
    out[n..n + TAG].copy_from_slice(tag.as_ref());
    n + TAG
}

/// Drains the destination sockets until told to stop; returns what it received.
fn receiver(sockets: Vec<UdpSocket>, stop: Arc<AtomicBool>, got: Arc<AtomicU64>) {
    let Ok(mut ep) = Epoll::new(1024) else {
        return;
    };
    for (i, s) in sockets.iter().enumerate() {
        let _ = ep.add(s.as_raw_fd(), i as u64);
    }
    let mut batch = RecvBatch::new(64);
    let mut ready = Vec::with_capacity(1024);
    let mut quiet_since: Option<Instant> = None;
    loop {
        ready.clear();
        if let Ok(t) = ep.wait(Duration::from_millis(5)) {
            ready.extend(t);
        }
        if ready.is_empty() {
            if stop.load(Ordering::Relaxed) {
                // Stopped and nothing left: done after a short quiet period.
                let q = *quiet_since.get_or_insert_with(Instant::now);
                if q.elapsed() > Duration::from_millis(50) {
                    return;
                }
            }
            continue;
        }
        quiet_since = None;
        for &t in &ready {
            let fd = sockets[t as usize].as_raw_fd();
            while let Ok(n) = batch.recv(fd) {
                if n == 0 {
                    break;
                }
                got.fetch_add(n as u64, Ordering::Relaxed);
                if n < batch.slots() {
                    break;
                }
            }
        }
    }
}

/// Runs `f` over `packets` in batches of `batch`; returns the seconds it took.
fn timed(
    packets: u64,
    batch: usize,
    mut f: impl FnMut(usize) -> Result<(), String>,
) -> Result<f64, String> {
    let t = Instant::now();
    let mut left = packets;
    while left > 0 {
        let n = left.min(batch as u64) as usize;
        f(n)?;
        left -= n as u64;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Runs the floor and returns its JSON line; an error for bad options or sockets.
pub fn run(o: &FloorOptions) -> Result<Value, String> {
    if o.packets == 0 || o.viewers == 0 || o.batch == 0 {
        return Err("--packets, --viewers and --batch must be at least 1".into());
    }
    if o.payload + HEADER + TAG > SLOT_BYTES {
        return Err(format!(
            "--payload must be at most {}",
            SLOT_BYTES - HEADER - TAG
        ));
    }
    if (raise_nofile() as usize) < o.viewers + 64 {
        return Err(format!(
            "{} destination sockets exceed the open file limit: raise it with ulimit -n",
            o.viewers
        ));
    }
    let ip: std::net::IpAddr = [127, 0, 0, 1].into();
    let mut sockets = Vec::with_capacity(o.viewers);
    for _ in 0..o.viewers {
        let s = udp_socket(ip).map_err(|e| format!("UDP socket: {e}"))?;
        set_buffers(&s, 1 << 20, 0);
        sockets.push(s);
    }
    let mut dests: Vec<Dest> = sockets
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut key = [0u8; 16];
            let mut salt = [0u8; 12];
            for (j, b) in key.iter_mut().chain(salt.iter_mut()).enumerate() {
                *b = (crate::media::stream::splitmix64((i * 64 + j) as u64) & 0xff) as u8;
            }
            let unbound = UnboundKey::new(&AES_128_GCM, &key).expect("16-byte key");
            Ok(Dest {
                addr: s.local_addr().map_err(|e| e.to_string())?,
                key: LessSafeKey::new(unbound),
                salt,
                ssrc: crate::media::stream::splitmix64(i as u64) as u32,
                index: (i as u64 * 7) & 0xfff,
            })
        })
        .collect::<Result<_, String>>()?;
    let payload: Vec<u8> = (0..o.payload)
        .map(|i| crate::media::stream::splitmix64(i as u64) as u8)
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicU64::new(0));
    let rx = {
        let (stop, got) = (stop.clone(), got.clone());
        std::thread::Builder::new()
            .name("floor-rx".into())
            .spawn(move || receiver(sockets, stop, got))
            .map_err(|e| e.to_string())?
    };
    let socket = UdpSocket::bind((ip, 0)).map_err(|e| format!("UDP socket: {e}"))?;
    set_buffers(&socket, 0, 4 << 20);
    let b = o.batch;
    let mut tx = SlotBatch::new(b, HEADER + o.payload + TAG, dests[0].addr);
    let fd = socket.as_raw_fd();
    let v = dests.len();
    let packets = o.packets;
    // Warm-up: caches, page faults, the receiver's first wakeups.
    let warm = (packets / 20).clamp(b as u64, 20_000);
    let mut next = 0usize;
    let encrypt = |dests: &mut [Dest], tx: &mut SlotBatch, n: usize, next: &mut usize| {
        for i in 0..n {
            let d = &mut dests[*next];
            tx.lens[i] = seal(d, &payload, &mut tx.bufs[i]);
            tx.dests[i] = d.addr;
            *next = (*next + 1) % v;
        }
    };
    let io = |e: std::io::Error| format!("sendmmsg: {e}");
    timed(warm, b, |n| {
        encrypt(&mut dests, &mut tx, n, &mut next);
        tx.send(fd, n).map(drop).map_err(io)
    })?;
    std::thread::sleep(Duration::from_millis(20));
    let received_before = got.load(Ordering::Relaxed);
    // Encryption alone.
    let encrypt_secs = timed(packets, b, |n| {
        encrypt(&mut dests, &mut tx, n, &mut next);
        Ok(())
    })?;
    // Sending alone: the last batch sealed, sent again to the same round robin of sockets.
    let mut k = 0usize;
    let send_secs = timed(packets, b, |n| {
        for i in 0..n {
            tx.dests[i] = dests[k].addr;
            k = (k + 1) % v;
        }
        tx.send(fd, n).map(drop).map_err(io)
    })?;
    // Both, as a forwarder does: seal a batch, send it.
    let both_secs = timed(packets, b, |n| {
        encrypt(&mut dests, &mut tx, n, &mut next);
        tx.send(fd, n).map(drop).map_err(io)
    })?;
    stop.store(true, Ordering::Relaxed);
    let _ = rx.join();
    let received = got.load(Ordering::Relaxed) - received_before;
    let ns = |secs: f64| (secs * 1e9 / packets as f64 * 10.0).round() / 10.0;
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    Ok(json!({
        "floor": true,
        "packets": packets,
        "viewers": o.viewers,
        "batch": b,
        "packet_bytes": HEADER + o.payload + TAG,
        "secs": r3(both_secs),
        "encrypt_secs": r3(encrypt_secs),
        "send_secs": r3(send_secs),
        "both_secs": r3(both_secs),
        "encrypt_ns_per_pkt": ns(encrypt_secs),
        "send_ns_per_pkt": ns(send_secs),
        "both_ns_per_pkt": ns(both_secs),
        "received": received,
        "received_pct": (received as f64 / (2 * packets) as f64 * 1e4).round() / 100.0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iv_follows_rfc_7714() {
        let salt = [0u8; 12];
        let iv = srtp_gcm_iv(&salt, 0x0102_0304, (5 << 16) | 0x0607);
        assert_eq!(iv, [0, 0, 1, 2, 3, 4, 0, 0, 0, 5, 6, 7]);
        let iv = srtp_gcm_iv(&[0xff; 12], 0, 0);
        assert_eq!(iv, [0xff; 12]);
    }

    #[test]
    fn sealed_packets_open_with_the_same_key() {
        let key = [7u8; 16];
        let mut d = Dest {
            addr: "127.0.0.1:9".parse().unwrap(),
            key: LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).unwrap()),
            salt: [3; 12],
            ssrc: 42,
            index: 65_535,
        };
        let mut out = vec![0u8; 128];
        let n = seal(&mut d, &[9u8; 100], &mut out);
        assert_eq!(n, 128);
        assert_eq!(&out[8..12], &42u32.to_be_bytes());
        let opener = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).unwrap());
        let iv = srtp_gcm_iv(&[3; 12], 42, 65_535);
        let (hdr, body) = out[..n].split_at_mut(HEADER);
        let plain = opener
            .open_in_place(Nonce::assume_unique_for_key(iv), Aad::from(&hdr[..]), body)
            .unwrap();
        assert_eq!(plain, &[9u8; 100][..]);
        assert_eq!(d.index, 65_536);
    }
}
