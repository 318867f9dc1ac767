//! The network facts lbs reasons about.

use std::net::Ipv4Addr;

pub use lbs_protocol::net::{Ipv4Cidr, MacAddr, ParseError};

/// One network interface as the backend sees it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct LinkInfo {
    /// The kernel's interface index.
    pub index: u32,
    /// Its name (`eth0`).
    pub name: String,
    /// Its hardware address.
    pub mac: MacAddr,
    /// Administratively up.
    pub up: bool,
    /// A cable is plugged in and the other end is alive (`LOWER_UP`).
    pub carrier: bool,
}

/// The default route.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DefaultRoute {
    /// The next hop.
    pub gateway: Ipv4Addr,
    /// The interface it leaves by.
    pub link: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_print_and_know_their_subnet() {
        let cidr: Ipv4Cidr = "192.168.1.2/24".parse().expect("valid");
        assert_eq!(cidr.to_string(), "192.168.1.2/24");
        assert_eq!(cidr.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(cidr.network(), Ipv4Addr::new(192, 168, 1, 0));
        assert!(cidr.contains(Ipv4Addr::new(192, 168, 1, 1)));
        assert!(!cidr.contains(Ipv4Addr::new(192, 168, 2, 1)));
        let other: Ipv4Cidr = "192.168.1.3/24".parse().expect("valid");
        assert!(cidr.same_subnet(&other));
        let all: Ipv4Cidr = "10.0.0.1/0".parse().expect("valid");
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
        let host: Ipv4Cidr = "10.0.0.1/32".parse().expect("valid");
        assert!(!host.contains(Ipv4Addr::new(10, 0, 0, 2)));
        for bad in [
            "192.168.1.2",
            "192.168.1.2/33",
            "x/24",
            "192.168.1.2/",
            "/24",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn macs_parse_and_print() {
        let mac: MacAddr = "5a:ec:b4:27:71:cf".parse().expect("valid");
        assert_eq!(mac.to_string(), "5a:ec:b4:27:71:cf");
        assert_eq!("5A-EC-B4-27-71-CF".parse::<MacAddr>(), Ok(mac));
        for bad in [
            "5a:ec:b4:27:71",
            "5a:ec:b4:27:71:cf:00",
            "5a:ec:b4:27:71:c",
            "zz:ec:b4:27:71:cf",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }
}
