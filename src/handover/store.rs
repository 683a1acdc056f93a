//! The service manager's side of restarts: the names under which a
//! listener's sockets are kept in systemd's fd store, and the sockets it
//! passes back (`$LISTEN_FDS`) read as a handover from no one.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::Duration;

use super::{Handed, HandedAdmin, Taken};
use crate::listen::ListenKey;

/// The name under which a listener's sockets are kept in the service
/// manager's fd store: role, protocol, service port and address (`:` made
/// `_`), so that two listeners of one service port on two addresses never
/// share a name (removing one would remove both). Reading a name back, the
/// address is the socket's own. (Kubernetes names hold no `/`, and none
/// holds `:`, which `$LISTEN_FDNAMES` uses as separator.)
pub fn store_name(key: &ListenKey, addr: SocketAddr) -> String {
    use crate::listen::ListenRole::*;
    let role = match key.role {
        Proxy => "p",
        ExternalProxy => "x",
        Proxy6 => "p6",
        ExternalProxy6 => "x6",
        NodePort(_) => "n",
        External(_) => "e",
        LoadBalancer(_) => "l",
    };
    let protocol = match key.protocol {
        crate::model::Protocol::Tcp => "tcp",
        crate::model::Protocol::Udp => "udp",
    };
    let name = &key.port;
    let addr = addr.to_string().replace(':', "_");
    format!("{role}/{protocol}/{}/{}/{}/{addr}", name.service.namespace, name.service.name, name.port)
}

/// The store name of an admin server's socket.
pub fn admin_store_name(name: &str) -> String {
    format!("admin/{name}")
}

/// The listener key a store name and the socket's address stand for.
pub(super) fn key_of_store_name(name: &str, local: SocketAddr) -> Option<ListenKey> {
    use crate::listen::ListenRole::*;
    // The address part (absent in names of the first release) is not read.
    let mut parts = name.splitn(6, '/');
    let (role, wanted_port) = match parts.next()? {
        "p" => (Proxy, 0),
        "x" => (ExternalProxy, 0),
        "p6" => (Proxy6, 0),
        "x6" => (ExternalProxy6, 0),
        "n" => (NodePort(local.ip()), local.port()),
        "e" => (External(local.ip()), local.port()),
        "l" => (LoadBalancer(local.ip()), local.port()),
        _ => return None,
    };
    let protocol = match parts.next()? {
        "tcp" => crate::model::Protocol::Tcp,
        "udp" => crate::model::Protocol::Udp,
        _ => return None,
    };
    let (namespace, service, port) = (parts.next()?, parts.next()?, parts.next()?);
    let port = crate::model::ServicePortName {
        service: crate::model::ServiceName::new(namespace, service),
        port: port.into(),
    };
    Some(ListenKey { port, protocol, role, wanted_port })
}

impl Taken {
    /// The sockets the service manager kept for us across a restart
    /// (`systemd::listen_fds`), sorted by their store names; `None` without
    /// any. A socket whose name or address cannot be read is closed.
    pub fn from_service_manager(fds: Vec<(String, OwnedFd)>) -> Option<Taken> {
        let (mut listeners, mut admin): (Vec<Handed>, Vec<HandedAdmin>) = (Vec::new(), Vec::new());
        for (name, fd) in fds {
            let local = socket2::SockRef::from(&fd).local_addr().ok().and_then(|a| a.as_socket());
            let Some(local) = local else {
                tracing::warn!(name, "a socket from the service manager with no address; closed");
                continue;
            };
            if let Some(what) = name.strip_prefix("admin/") {
                admin.push(HandedAdmin { name: what.to_owned(), addr: local, socket: fd });
                continue;
            }
            let Some(key) = key_of_store_name(&name, local) else {
                tracing::warn!(name, "a socket from the service manager under an unknown name; closed");
                continue;
            };
            match listeners.iter_mut().find(|h| h.key == key) {
                Some(h) => h.sockets.push(fd),
                None => listeners.push(Handed { key, addr: local, sockets: vec![fd] }),
            }
        }
        if listeners.is_empty() && admin.is_empty() {
            return None;
        }
        let sockets: usize = listeners.iter().map(|h| h.sockets.len()).sum();
        tracing::info!(
            listeners = listeners.len(),
            sockets,
            admin = admin.len(),
            "took the sockets the service manager kept across the restart"
        );
        Some(Taken { conn: None, timeout: Duration::ZERO, from_pid: 0, listeners, admin })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listen::ListenRole;
    use crate::model::{Protocol, ServiceName, ServicePortName};

    #[test]
    fn a_store_name_and_the_socket_address_give_back_the_listener_key() {
        let port = ServicePortName { service: ServiceName::new("default", "web"), port: "http".into() };
        let at: SocketAddr = "127.0.0.1:30080".parse().unwrap();
        for (role, wanted_port) in [(ListenRole::Proxy, 0), (ListenRole::NodePort(at.ip()), 30080)] {
            let key = ListenKey { port: port.clone(), protocol: Protocol::Udp, role, wanted_port };
            let name = store_name(&key, at);
            assert!(!name.contains(':') && name.len() < 256, "{name}");
            assert_eq!(key_of_store_name(&name, at), Some(key.clone()));
            let other: SocketAddr = "[::1]:30080".parse().unwrap();
            assert_ne!(store_name(&key, other), name, "two addresses, two names");
            assert!(!store_name(&key, other).contains(':'));
        }
        let old_format = "n/tcp/default/web/http";
        assert!(key_of_store_name(old_format, at).is_some(), "a name without the address still reads");
        assert_eq!(key_of_store_name("q/tcp/a/b/c", at), None);
    }
}
