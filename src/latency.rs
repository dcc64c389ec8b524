//! A UDP socket for quinn that holds each datagram from a configured
//! address for the one-way delay of its link (with optional jitter and
//! loss) before handing it over, so benchmarks and tests can run a cluster
//! "across continents" on one machine. The kernel here has no `tc netem`;
//! quinn accepts any socket through `Endpoint::new_with_abstract_socket`.
//!
//! Datagrams wait on arrival, not before they leave: what a node sent
//! before it was killed still arrives, as it would across a real network.
//! (Until 2026-12-05 they waited in the sender, and a leader killed in the
//! WAN bench took up to 155 ms of its last appends with it: the next
//! leader's first append then found a follower short and cost a round
//! trip.) A thread of its own wakes the receiving task when the next one
//! is due: tokio's timers round up to the next millisecond, which made
//! every hop up to a millisecond longer than its link's delay.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
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

/// Datagrams that arrived from one address (several of `stride` bytes
/// if the kernel coalesced them), waiting until they are due.
struct Arrival {
    due: Instant,
    meta: RecvMeta,
    contents: Vec<u8>,
}

/// What arrived and is not handed over yet, per link in arrival order.
#[derive(Default)]
struct Arrivals {
    links: HashMap<SocketAddr, VecDeque<Arrival>>,
    /// Buffers of datagrams handed over, reused for the next ones.
    spare: Vec<Vec<u8>>,
}

impl Arrivals {
    /// Most buffers kept spare: enough for every datagram in flight on a
    /// fast link across an ocean, bounded so a burst does not pin its
    /// memory for good.
    const MAX_SPARE: usize = 512;

    fn copy(&mut self, contents: &[u8]) -> Vec<u8> {
        let mut buffer = self.spare.pop().unwrap_or_default();
        buffer.clear();
        buffer.extend_from_slice(contents);
        buffer
    }

    /// Copies into `bufs` what is due at `now`, the earliest due first
    /// across links (each link is FIFO), as a host takes datagrams off
    /// the wire; says how many. Served link by link in the map's order, a
    /// busy link filled every batch and the others waited behind it.
    fn hand_over_due(
        &mut self,
        now: Instant,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> usize {
        let mut count = 0;
        while count < bufs.len().min(meta.len()) {
            let Some(arrival) = self
                .links
                .values_mut()
                .filter(|queue| queue.front().is_some_and(|a| a.due <= now))
                .min_by_key(|queue| queue.front().map(|a| a.due))
                .and_then(VecDeque::pop_front)
            else {
                break;
            };
            let len = arrival.contents.len().min(bufs[count].len());
            bufs[count][..len].copy_from_slice(&arrival.contents[..len]);
            meta[count] = RecvMeta {
                len,
                ..arrival.meta
            };
            count += 1;
            if self.spare.len() < Self::MAX_SPARE {
                self.spare.push(arrival.contents);
            }
        }
        count
    }

    /// The earliest due time of any link's oldest arrival.
    fn next_due(&self) -> Option<Instant> {
        self.links
            .values()
            .filter_map(|q| q.front())
            .map(|a| a.due)
            .min()
    }
}

/// Wakes the receiving task when the next held datagram is due.
#[derive(Default)]
struct Alarm {
    state: Mutex<AlarmState>,
    changed: Condvar,
}

#[derive(Default)]
struct AlarmState {
    due: Option<(Instant, Waker)>,
    closed: bool,
}

impl Alarm {
    /// Wakes `waker` at `due`. The thread is told only if that moves
    /// the alarm earlier or to another task: a receive with nothing due
    /// sets the same alarm again and again, and waking the thread for
    /// each cost a futex call per poll.
    fn set(&self, due: Instant, waker: &Waker) {
        if let Ok(mut state) = self.state.lock() {
            if let Some((set, set_waker)) = &state.due {
                if *set <= due && set_waker.will_wake(waker) {
                    return;
                }
            }
            state.due = Some((due, waker.clone()));
            self.changed.notify_one();
        }
    }

    fn close(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.closed = true;
            self.changed.notify_one();
        }
    }

    /// Until closed: sleeps until the alarm is due, then wakes its task.
    fn run(&self) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        loop {
            if state.closed {
                return;
            }
            let wait = match &state.due {
                None => None,
                Some((due, _)) => match due.checked_duration_since(Instant::now()) {
                    Some(wait) if !wait.is_zero() => Some(wait),
                    _ => {
                        if let Some((_, waker)) = state.due.take() {
                            waker.wake();
                        }
                        continue;
                    }
                },
            };
            state = match wait {
                None => match self.changed.wait(state) {
                    Ok(state) => state,
                    Err(_) => return,
                },
                Some(wait) => match self.changed.wait_timeout(state, wait) {
                    Ok((state, _)) => state,
                    Err(_) => return,
                },
            };
        }
    }
}

/// Wraps a real socket; datagrams from configured addresses wait their
/// link's delay, in arrival order per link, before quinn sees them.
pub struct DelayedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    delays: HashMap<SocketAddr, LinkDelay>,
    arrivals: Mutex<Arrivals>,
    alarm: Arc<Alarm>,
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
    /// Delays datagrams that `socket` receives from the given addresses.
    pub fn new(
        socket: std::net::UdpSocket,
        delays: HashMap<SocketAddr, LinkDelay>,
    ) -> io::Result<Arc<Self>> {
        let addr = socket.local_addr()?;
        let inner = quinn::TokioRuntime.wrap_udp_socket(socket)?;
        let alarm = Arc::new(Alarm::default());
        let thread_alarm = alarm.clone();
        std::thread::Builder::new()
            .name("delay-line".into())
            .spawn(move || thread_alarm.run())?;
        Ok(Arc::new(DelayedSocket {
            inner,
            delays,
            arrivals: Mutex::new(Arrivals::default()),
            alarm,
            rng: Mutex::new(Rng::new(addr.port() as u64)),
        }))
    }

    /// Holds what just arrived from the kernel on a delayed link: each
    /// datagram until its due time (dropped if the link loses it).
    fn hold(&self, arrivals: &mut Arrivals, link: LinkDelay, meta: RecvMeta, contents: &[u8]) {
        let now = Instant::now();
        let mut rng = self.rng.lock().ok();
        let mut draw = |link: &LinkDelay| {
            let Some(rng) = rng.as_mut() else {
                return (false, Duration::ZERO);
            };
            let lost = link.loss > 0.0 && rng.chance(link.loss);
            let jitter = Duration::from_nanos(rng.range(0, link.jitter.as_nanos() as u64 + 1));
            (lost, jitter)
        };
        // Segments are dropped one by one; without loss the coalesced
        // datagrams stay together, as quinn would have read them.
        let segment = if link.loss > 0.0 {
            meta.stride.max(1)
        } else {
            contents.len().max(1)
        };
        for datagram in contents.chunks(segment) {
            let (lost, jitter) = draw(&link);
            if lost {
                continue;
            }
            // Each link is FIFO: jitter delays, it never reorders.
            let last = arrivals.links.get(&meta.addr).and_then(|q| q.back());
            let due = (now + link.delay + jitter).max(last.map_or(now, |a| a.due));
            let copy = arrivals.copy(datagram);
            let meta = RecvMeta {
                len: datagram.len(),
                stride: meta.stride.min(datagram.len()).max(1),
                ..meta
            };
            arrivals
                .links
                .entry(meta.addr)
                .or_default()
                .push_back(Arrival {
                    due,
                    meta,
                    contents: copy,
                });
        }
    }
}

impl Drop for DelayedSocket {
    fn drop(&mut self) {
        self.alarm.close();
    }
}

impl AsyncUdpSocket for DelayedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let Ok(mut arrivals) = self.arrivals.lock() else {
            return self.inner.poll_recv(cx, bufs, meta);
        };
        let arrivals = &mut *arrivals;
        let room = bufs.len().min(meta.len());
        // 1. What was held and is due now.
        let mut count =
            arrivals.hand_over_due(Instant::now(), &mut bufs[..room], &mut meta[..room]);
        // 2. Fresh datagrams, read from the kernel straight into quinn's
        //    buffers until it has no more (which also asks to be woken
        //    when more comes) or the buffers are full. Those from a link
        //    without a delay stay where they are, with no copy: a QUIC
        //    client beside a node may send it all its messages, and
        //    copying them into a queue and back out is work a real
        //    network does not add. Those from a delayed link are taken
        //    out to wait, and their room is read into again.
        while count < room {
            match self
                .inner
                .poll_recv(cx, &mut bufs[count..room], &mut meta[count..room])
            {
                Poll::Ready(Ok(0)) => break,
                Poll::Ready(Ok(read)) => {
                    let mut kept = count;
                    for slot in count..count + read {
                        let received = meta[slot];
                        if let Some(link) = self.delays.get(&received.addr) {
                            self.hold(arrivals, *link, received, &bufs[slot][..received.len]);
                            continue;
                        }
                        if kept != slot {
                            let (front, back) = bufs.split_at_mut(slot);
                            front[kept][..received.len].copy_from_slice(&back[0][..received.len]);
                        }
                        meta[kept] = received;
                        kept += 1;
                    }
                    count = kept;
                }
                // Datagrams already read into quinn's buffers cannot wait
                // behind an error: they go, and the error is not reported.
                // quinn itself skips a reset (an ICMP answer to an earlier
                // send); a lasting error comes again at the next read.
                Poll::Ready(Err(_)) if count > 0 => break,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => break,
            }
        }
        if count > 0 {
            return Poll::Ready(Ok(count));
        }
        // 3. Nothing due yet: be woken when the next is.
        if let Some(due) = arrivals.next_due() {
            self.alarm.set(due, cx.waker());
        }
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
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

    /// A socket on loopback that delays what comes from each address as given.
    fn delaying(delays: impl IntoIterator<Item = (SocketAddr, u64)>) -> Arc<DelayedSocket> {
        let delays = delays
            .into_iter()
            .map(|(from, ms)| {
                let link = LinkDelay {
                    delay: Duration::from_millis(ms),
                    ..Default::default()
                };
                (from, link)
            })
            .collect();
        DelayedSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap(), delays).unwrap()
    }

    /// Receives one batch of datagrams through quinn's interface.
    async fn receive(socket: &DelayedSocket) -> (RecvMeta, Vec<u8>) {
        let mut buf = vec![0u8; 1500];
        let mut meta = [RecvMeta::default()];
        let count = std::future::poll_fn(|cx| {
            let mut bufs = [IoSliceMut::new(&mut buf)];
            socket.poll_recv(cx, &mut bufs, &mut meta)
        })
        .await
        .unwrap();
        assert_eq!(count, 1);
        (meta[0], buf[..meta[0].len].to_vec())
    }

    /// A datagram from a delayed link waits out its delay on arrival, so
    /// one sent just before its sender died still comes: a killed
    /// node's last appends reach its followers, as across a real network.
    #[tokio::test]
    async fn datagrams_wait_for_their_link_and_outlive_their_sender() {
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let from = sender.local_addr().unwrap();
        let socket = delaying([(from, 80)]);
        let to = socket.local_addr().unwrap();
        let started = std::time::Instant::now();
        sender.send_to(b"hello", to).unwrap();
        drop(sender);
        let (meta, contents) = receive(&socket).await;
        assert_eq!((meta.addr, contents.as_slice()), (from, &b"hello"[..]));
        assert!(started.elapsed() >= Duration::from_millis(80));
        // From an address with no delay: at once.
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let started = std::time::Instant::now();
        other.send_to(b"now", to).unwrap();
        let (meta, contents) = receive(&socket).await;
        assert_eq!(
            (meta.addr, contents.as_slice()),
            (other.local_addr().unwrap(), &b"now"[..])
        );
        assert!(started.elapsed() < Duration::from_millis(80));
    }

    /// Polls once, taking in what the kernel holds, without waiting.
    fn poll_once(socket: &DelayedSocket) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut buf = vec![0u8; 1500];
        let mut bufs = [IoSliceMut::new(&mut buf)];
        let mut meta = [RecvMeta::default()];
        socket.poll_recv(&mut cx, &mut bufs, &mut meta).is_ready()
    }

    /// Datagrams due from several links come out earliest due first, as
    /// off a wire: a later one on a shorter link overtakes an earlier one
    /// on a longer link. (Links were served in the map's order: the
    /// second came first only by chance.)
    #[tokio::test]
    async fn links_are_served_in_the_order_their_datagrams_are_due() {
        let slow = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fast = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let socket = delaying([
            (slow.local_addr().unwrap(), 40),
            (fast.local_addr().unwrap(), 5),
        ]);
        let to = socket.local_addr().unwrap();
        // The slow link's datagram is taken in first (due in 40 ms), the
        // fast one's 10 ms later (due in 15 ms); both are due by the time
        // the socket is read again.
        slow.send_to(b"slow", to).unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(!poll_once(&socket), "nothing is due yet");
        tokio::time::sleep(Duration::from_millis(10)).await;
        fast.send_to(b"fast", to).unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(!poll_once(&socket), "nothing is due yet");
        tokio::time::sleep(Duration::from_millis(60)).await;
        let (_, first) = receive(&socket).await;
        let (_, second) = receive(&socket).await;
        assert_eq!(
            (first.as_slice(), second.as_slice()),
            (&b"fast"[..], &b"slow"[..])
        );
    }

    /// Datagrams from a link without a delay come out as they arrived, in
    /// order and whole, even when one from a delayed link was read in the
    /// same batch between them (it is taken out to wait, and the ones
    /// after it move up into its room).
    #[tokio::test]
    async fn undelayed_datagrams_pass_around_a_delayed_one() {
        let delayed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let direct = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let socket = delaying([(delayed.local_addr().unwrap(), 40)]);
        let to = socket.local_addr().unwrap();
        direct.send_to(b"first", to).unwrap();
        delayed.send_to(b"waits", to).unwrap();
        direct.send_to(b"second, longer", to).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut buffers = vec![vec![0u8; 1500]; 4];
        let mut meta = [RecvMeta::default(); 4];
        let mut got = Vec::new();
        while got.len() < 2 {
            let count = std::future::poll_fn(|cx| {
                let mut bufs: Vec<IoSliceMut<'_>> =
                    buffers.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                socket.poll_recv(cx, &mut bufs, &mut meta)
            })
            .await
            .unwrap();
            for (m, b) in meta.iter().zip(&buffers).take(count) {
                got.push((m.addr, b[..m.len].to_vec()));
            }
        }
        let from = direct.local_addr().unwrap();
        assert_eq!(
            got,
            vec![
                (from, b"first".to_vec()),
                (from, b"second, longer".to_vec())
            ]
        );
        let (meta, contents) = receive(&socket).await;
        assert_eq!(
            (meta.addr, contents.as_slice()),
            (delayed.local_addr().unwrap(), &b"waits"[..])
        );
    }
}
