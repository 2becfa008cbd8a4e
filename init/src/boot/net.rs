//! The network PID 1 sets up: loopback always, and a static IPv4 address on eth0 when the
//! provisioning config asks for one. Plain `SIOC*` ioctls on an `AF_INET` socket.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::provision::Network;

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} is too long"),
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn ioctl(fd: &OwnedFd, request: libc::Ioctl, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: `arg` points to the struct `request` expects (ifreq or rtentry), alive for
    // the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as
    // sockaddr_in because sin_family is AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Brings interface `name` up.
pub fn link_up(name: &str) -> io::Result<()> {
    let fd = socket()?;
    let mut req = ifreq(name)?;
    ioctl(&fd, libc::SIOCGIFFLAGS, (&raw mut req).cast())?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    ioctl(&fd, libc::SIOCSIFFLAGS, (&raw mut req).cast())
}

/// Gives `name` the address and netmask of `net`, brings it up, and adds the default route
/// through the gateway, if any.
pub fn configure(name: &str, net: &Network) -> io::Result<()> {
    let fd = socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr(net.address);
    ioctl(&fd, libc::SIOCSIFADDR, (&raw mut req).cast())?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr(net.netmask());
    ioctl(&fd, libc::SIOCSIFNETMASK, (&raw mut req).cast())?;
    link_up(name)?;
    if let Some(gw) = net.gateway {
        // SAFETY: rtentry is plain old data; all-zero is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        ioctl(&fd, libc::SIOCADDRT, (&raw mut rt).cast())?;
    }
    Ok(())
}
