//! UDP sockets for QUIC, for nodes and clients alike.

use std::net::SocketAddr;
use std::sync::Arc;

/// Kernel buffers asked for on each socket (the kernel caps them at
/// `net.core.rmem_max` / `wmem_max`).
const UDP_BUFFER_BYTES: usize = 8 << 20;

/// Binds a UDP socket with large kernel buffers. With the
/// default (about 208 KB) a burst from a fast peer overflows the receive
/// buffer while the node is busy; QUIC takes the dropped datagrams for
/// congestion and halves its window. Across a 140 ms round trip that cut a
/// pipelined client's rate by more than half. A client sharing one socket
/// among hundreds of connections overflows it the same way, and a lost
/// "busy" close leaves it talking to a connection the node has forgotten
/// (it then sees a reset with no reason).
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: a smaller buffer works, only less well.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A QUIC endpoint that only dials out, on a `bind_udp` socket (many
/// connections may share it: `Client::on_endpoint`). Call it inside a
/// tokio runtime.
pub fn client_endpoint(addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        bind_udp(addr)?,
        Arc::new(quinn::TokioRuntime),
    )
}
