//! The speaker's link-layer sockets: AF_PACKET sockets bound to one
//! interface and one EtherType, with a classic-BPF filter, driven by tokio;
//! and the IPv6 multicast memberships that make the kernel (and snooping
//! switches) deliver neighbour solicitations to us.
//!
//! The workspace forbids unsafe code; this crate only denies it, so that
//! it can be allowed in the two functions that cannot do without:
//! `link_address` (socket2 has no safe constructor for a link-layer
//! address) and `register` (tokio made registering a descriptor `unsafe`).
//! Everything else goes through socket2's and tokio's safe API.

pub mod filters;
mod groups;

use std::io::{self, Read};

use socket2::{Domain, SockAddr, SockAddrStorage, SockFilter, Socket, Type, socklen_t};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

pub use groups::{SolicitedNodeGroups, solicited_node};

pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86DD;

/// A raw (whole Ethernet frame) AF_PACKET socket that receives only frames
/// of one EtherType arriving on one interface and passing its filter, and
/// sends whole frames on that interface.
#[derive(Debug)]
pub struct PacketSocket {
    inner: AsyncFd<Socket>,
    ifindex: u32,
}

impl PacketSocket {
    /// Opens the socket on `ifindex` for `ethertype` with `filter`
    /// attached ([`filters`]). Needs CAP_NET_RAW. Must be called inside a
    /// tokio runtime with I/O enabled.
    pub fn open(ifindex: u32, ethertype: u16, filter: &[SockFilter]) -> io::Result<Self> {
        // Created with protocol 0, the socket receives nothing until the
        // bind below names the protocol and the interface together. With
        // the EtherType given here, frames from every interface would be
        // queued in the moment between socket() and bind().
        let socket = Socket::new(Domain::PACKET, Type::RAW, None)?;
        // Filter first, so nothing unfiltered is queued once bound.
        socket.attach_filter(filter)?;
        socket.bind(&link_address(ifindex, ethertype)?)?;
        socket.set_nonblocking(true)?;
        Ok(PacketSocket {
            inner: register(socket)?,
            ifindex,
        })
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Waits for the next frame and copies it into `buf`, returning its
    /// length. A frame longer than `buf` is cut to fit: give at least the
    /// interface MTU plus 14 bytes.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.inner.readable().await?;
            match guard.try_io(|s| Read::read(&mut s.get_ref(), buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends one whole Ethernet frame (header included) on the bound
    /// interface.
    pub async fn send(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            let mut guard = self.inner.writable().await?;
            match guard.try_io(|s| s.get_ref().send(frame)) {
                Ok(Ok(n)) if n == frame.len() => return Ok(()),
                Ok(Ok(n)) => {
                    return Err(io::Error::other(format!(
                        "sent {n} of {} bytes of a frame",
                        frame.len()
                    )));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Hands `socket` to the tokio reactor. Since tokio 1.54 registering a
/// file descriptor is `unsafe` (the safe `AsyncFd::new` is deprecated as
/// unsound for types whose descriptor can change), hence this crate's
/// second unsafe block.
#[allow(unsafe_code)]
fn register(socket: Socket) -> io::Result<AsyncFd<Socket>> {
    // SAFETY: a `Socket` owns its descriptor: `as_raw_fd` returns the same
    // open descriptor for as long as the `Socket` lives, nothing here
    // replaces it, and it is closed only when the `Socket` is dropped, which
    // `AsyncFd` does after deregistering it.
    let fd =
        unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE | Interest::WRITABLE) };
    fd.map_err(io::Error::from)
}

/// The `sockaddr_ll` that binds a packet socket to `ifindex` and
/// `ethertype`. socket2 has no constructor for link-layer addresses, so
/// this is the crate's one unsafe block.
#[allow(unsafe_code)]
fn link_address(ifindex: u32, ethertype: u16) -> io::Result<SockAddr> {
    let ifindex = i32::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface index too large"))?;
    let mut storage = SockAddrStorage::zeroed();
    let len = std::mem::size_of::<libc::sockaddr_ll>();
    // SAFETY: `sockaddr_ll` is a `sockaddr_*` type of this platform, which
    // is what `view_as` requires (it also asserts it fits the storage).
    // The storage is zeroed, so the fields not set here (hatype, pkttype,
    // halen, addr: unused by bind) are valid zeros. `len` is exactly the
    // size of the structure written, as `SockAddr::new` requires, and it
    // fits `socklen_t` (20 bytes).
    let address = unsafe {
        let sll = storage.view_as::<libc::sockaddr_ll>();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ethertype.to_be();
        sll.sll_ifindex = ifindex;
        SockAddr::new(storage, len as socklen_t)
    };
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_address_is_a_packet_address() {
        let a = link_address(7, ETHERTYPE_ARP).unwrap();
        assert_eq!(a.family(), libc::AF_PACKET as u16);
        assert_eq!(a.len() as usize, std::mem::size_of::<libc::sockaddr_ll>());
        assert!(link_address(u32::MAX, ETHERTYPE_ARP).is_err());
    }
}
