//! A UDP socket for quinn that holds each outgoing datagram for the one-way
//! delay of its link (with optional jitter and loss), so benchmarks and
//! tests can run a cluster "across continents" on one machine. The kernel
//! here has no `tc netem`; quinn accepts any socket through
//! `Endpoint::new_with_abstract_socket`.
//!
//! The held datagrams leave from a thread of their own that sleeps until
//! the next one is due: tokio's timers round up to the next millisecond,
//! which made every hop up to a millisecond longer than its link's delay.
//! Their buffers go back to a pool once sent: a fresh allocation per held
//! transmit (up to 64 KiB with GSO) was page faults and glibc heap
//! consolidation on the sending node's QUIC threads, about a tenth of the
//! machine in the WAN benchmark's pipelined phase, a cost of the simulation
//! that a real WAN does not have.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};

use crate::raft::rng::Rng;

/// The impairment of the path to one destination.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkDelay {
    pub delay: Duration,
    /// Uniform extra delay in `0..jitter` (reorders nothing: each link is FIFO).
    pub jitter: Duration,
    /// Fraction of datagrams dropped.
    pub loss: f64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad --simulate-delay item {0:?}: expected host:port=DELAYms[~JITTERms][/LOSS%]")]
pub struct DelaySpecError(String);

/// Parses `127.0.0.1:7002=70ms,127.0.0.1:7003=155ms~5ms/1%`.
pub fn parse_delays(spec: &str) -> Result<HashMap<SocketAddr, LinkDelay>, DelaySpecError> {
    let mut delays = HashMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = || DelaySpecError(item.to_string());
        let (addr, rest) = item.split_once('=').ok_or_else(bad)?;
        let addr: SocketAddr = addr.parse().map_err(|_| bad())?;
        let (rest, loss) = match rest.split_once('/') {
            Some((rest, loss)) => {
                let percent: f64 = loss.trim_end_matches('%').parse().map_err(|_| bad())?;
                (rest, percent / 100.0)
            }
            None => (rest, 0.0),
        };
        let (delay, jitter) = match rest.split_once('~') {
            Some((delay, jitter)) => (delay, Some(jitter)),
            None => (rest, None),
        };
        let ms = |text: &str| -> Result<Duration, DelaySpecError> {
            let value: f64 = text.trim_end_matches("ms").parse().map_err(|_| bad())?;
            Ok(Duration::from_secs_f64(value / 1000.0))
        };
        delays.insert(
            addr,
            LinkDelay {
                delay: ms(delay)?,
                jitter: jitter.map(ms).transpose()?.unwrap_or_default(),
                loss,
            },
        );
    }
    Ok(delays)
}

/// A held transmit: one datagram, or several of `segment_size` bytes sent
/// with one system call (GSO), as quinn handed them over.
struct Delayed {
    due: Instant,
    destination: SocketAddr,
    ecn: Option<quinn::udp::EcnCodepoint>,
    contents: Vec<u8>,
    segment_size: Option<usize>,
}

/// Buffers of sent transmits, reused for the next ones.
#[derive(Default)]
struct Spare(Mutex<Vec<Vec<u8>>>);

impl Spare {
    /// Most buffers kept: enough for every transmit in flight on a fast
    /// link across an ocean (~10 MB of 64 KiB transmits), bounded so a
    /// burst does not pin its memory for good.
    const MAX: usize = 512;

    /// A copy of `contents` in a reused buffer if one is spare.
    fn copy(&self, contents: &[u8]) -> Vec<u8> {
        let reused = self.0.lock().ok().and_then(|mut spare| spare.pop());
        let mut buffer = reused.unwrap_or_default();
        buffer.clear();
        buffer.extend_from_slice(contents);
        buffer
    }

    fn give_back(&self, buffer: Vec<u8>) {
        if let Ok(mut spare) = self.0.lock() {
            if spare.len() < Self::MAX {
                spare.push(buffer);
            }
        }
    }
}

/// Wraps a real socket; datagrams to configured destinations wait their
/// link's delay in a per-destination FIFO before leaving.
pub struct DelayedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    delays: HashMap<SocketAddr, LinkDelay>,
    /// To the thread that sends held datagrams when they are due.
    held: Mutex<mpsc::Sender<Delayed>>,
    /// Where that thread returns the buffers it has sent.
    spare: Arc<Spare>,
    /// How that thread sends: it turns GSO off if the kernel refuses it.
    state: Arc<quinn::udp::UdpSocketState>,
    rng: Mutex<Rng>,
}

impl fmt::Debug for DelayedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DelayedSocket")
            .field("delays", &self.delays)
            .finish()
    }
}

impl DelayedSocket {
    /// Delays datagrams sent through `socket` to the given destinations.
    pub fn new(
        socket: std::net::UdpSocket,
        delays: HashMap<SocketAddr, LinkDelay>,
    ) -> io::Result<Arc<Self>> {
        let addr = socket.local_addr()?;
        let sender = socket.try_clone()?;
        let inner = quinn::TokioRuntime.wrap_udp_socket(socket)?;
        let state = Arc::new(quinn::udp::UdpSocketState::new((&sender).into())?);
        let (held, queue) = mpsc::channel();
        let thread_state = state.clone();
        let spare = Arc::new(Spare::default());
        let thread_spare = spare.clone();
        std::thread::Builder::new()
            .name("delay-line".into())
            .spawn(move || send_when_due(&sender, &thread_state, queue, &thread_spare))?;
        Ok(Arc::new(DelayedSocket {
            inner,
            delays,
            held: Mutex::new(held),
            spare,
            state,
            rng: Mutex::new(Rng::new(addr.port() as u64)),
        }))
    }
}

/// Sends each held datagram when it is due, in order per destination,
/// until the socket is dropped.
fn send_when_due(
    socket: &std::net::UdpSocket,
    state: &quinn::udp::UdpSocketState,
    queue: mpsc::Receiver<Delayed>,
    spare: &Spare,
) {
    let mut links: HashMap<SocketAddr, VecDeque<Delayed>> = HashMap::new();
    loop {
        let next = links
            .values()
            .filter_map(|q| q.front())
            .map(|d| d.due)
            .min();
        let arrived = match next {
            None => match queue.recv() {
                Ok(item) => Some(item),
                Err(_) => return,
            },
            Some(due) => match queue.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Ok(item) => Some(item),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            },
        };
        if let Some(item) = arrived {
            for item in std::iter::once(item).chain(queue.try_iter()) {
                links.entry(item.destination).or_default().push_back(item);
            }
        }
        let now = Instant::now();
        for link in links.values_mut() {
            while link.front().is_some_and(|d| d.due <= now) {
                if let Some(item) = link.pop_front() {
                    send(socket, state, &item);
                    spare.give_back(item.contents);
                }
            }
        }
    }
}

/// Sends one held transmit, waiting out a full send buffer (the socket is
/// non-blocking: quinn shares it).
fn send(socket: &std::net::UdpSocket, state: &quinn::udp::UdpSocketState, item: &Delayed) {
    let transmit = Transmit {
        destination: item.destination,
        ecn: item.ecn,
        contents: &item.contents,
        segment_size: item.segment_size,
        src_ip: None,
    };
    for _ in 0..1000 {
        match state.send(socket.into(), &transmit) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(50));
            }
            _ => return,
        }
    }
}

impl AsyncUdpSocket for DelayedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(link) = self.delays.get(&transmit.destination).copied() else {
            return self.inner.try_send(transmit);
        };
        let Ok(held) = self.held.lock() else {
            return self.inner.try_send(transmit);
        };
        let segment = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        if link.loss == 0.0 {
            // Nothing to drop: hold the transmit whole, so that it leaves
            // with one system call as it would without the delay.
            let jitter = match self.rng.lock() {
                Ok(mut rng) => {
                    Duration::from_nanos(rng.range(0, link.jitter.as_nanos() as u64 + 1))
                }
                Err(_) => Duration::ZERO,
            };
            let _ = held.send(Delayed {
                due: Instant::now() + link.delay + jitter,
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents: self.spare.copy(transmit.contents),
                segment_size: transmit.segment_size,
            });
            return Ok(());
        }
        for datagram in transmit.contents.chunks(segment) {
            let (lost, jitter) = match self.rng.lock() {
                Ok(mut rng) => (
                    rng.chance(link.loss),
                    Duration::from_nanos(rng.range(0, link.jitter.as_nanos() as u64 + 1)),
                ),
                Err(_) => (false, Duration::ZERO),
            };
            if lost {
                continue;
            }
            let _ = held.send(Delayed {
                due: Instant::now() + link.delay + jitter,
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents: self.spare.copy(datagram),
                segment_size: None,
            });
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner
            .max_transmit_segments()
            .min(self.state.max_gso_segments())
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_delay_specs() {
        let delays = parse_delays("127.0.0.1:7002=70ms,127.0.0.1:7003=155ms~5ms/1%").unwrap();
        let addr: SocketAddr = "127.0.0.1:7003".parse().unwrap();
        assert_eq!(delays[&addr].delay, Duration::from_millis(155));
        assert_eq!(delays[&addr].jitter, Duration::from_millis(5));
        assert!((delays[&addr].loss - 0.01).abs() < 1e-9);
        assert!(parse_delays("nohost=5ms").is_err());
        assert!(parse_delays("127.0.0.1:1=fast").is_err());
    }

    #[tokio::test]
    async fn datagrams_wait_for_their_link() {
        let receiver = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = receiver.local_addr().unwrap();
        let delays = HashMap::from([(
            to,
            LinkDelay {
                delay: Duration::from_millis(80),
                ..Default::default()
            },
        )]);
        let socket =
            DelayedSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap(), delays).unwrap();
        let started = std::time::Instant::now();
        socket
            .try_send(&Transmit {
                destination: to,
                ecn: None,
                contents: b"hello",
                segment_size: None,
                src_ip: None,
            })
            .unwrap();
        let mut buf = [0u8; 16];
        let (len, _) = receiver.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..len], b"hello");
        assert!(started.elapsed() >= Duration::from_millis(80));
    }
}
