//! Kubernetes' own rules for names and endpoint addresses, as the API
//! server applies them, so that a manifest file is held to what `kubectl
//! apply` would accept.
//!
//! Names end up in logs, `/metrics` label values and `ringport check`'s
//! table; bounding their length and charset here keeps a 1 MB name or a
//! quote-and-newline name from ever reaching those. The rules (from
//! `k8s.io/apimachinery/pkg/util/validation`):
//! - DNS-1035 label (Service names): at most 63 of `[a-z0-9-]`, starting with
//!   a letter, ending with a letter or digit.
//! - DNS-1123 label (namespaces, port names): at most 63 of `[a-z0-9-]`,
//!   starting and ending with a letter or digit.
//! - DNS-1123 subdomain (EndpointSlice and Endpoints names): at most 253
//!   characters, DNS-1123 labels joined by `.` (each label up to 63 here is
//!   implied by the charset rule the API server uses: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`
//!   separated by dots).
//! - Label values (`kubernetes.io/service-name`): at most 63 of
//!   `[A-Za-z0-9-_.]`, starting and ending alphanumeric, or empty.
//! - IANA_SVC_NAME (named target ports): see [`super::port_name`].
//!
//! Endpoint addresses: unspecified (`0.0.0.0`, `::`), multicast and the
//! IPv4 broadcast address can never be a backend and are refused, as the
//! API server refuses them; link-local addresses (such as the cloud
//! metadata service at 169.254.169.254) are allowed but warned about;
//! loopback stays allowed for the edge proxy.

use std::net::IpAddr;

use super::ConfigErrorKind;

/// Which naming rule a value follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    Dns1035Label,
    Dns1123Label,
    Dns1123Subdomain,
    LabelValue,
}

impl NameRule {
    fn describe(self) -> &'static str {
        match self {
            NameRule::Dns1035Label => {
                "a DNS-1035 label: at most 63 lowercase letters, digits and '-', starting with a letter and ending with a letter or digit"
            }
            NameRule::Dns1123Label => {
                "a DNS-1123 label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
            }
            NameRule::Dns1123Subdomain => {
                "a DNS-1123 subdomain: at most 253 characters, DNS-1123 labels separated by '.'"
            }
            NameRule::LabelValue => {
                "a label value: at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
            }
        }
    }
}

/// `Ok` when `value` follows `rule`; the error shows at most the start of a
/// long value.
pub fn check_name(value: &str, rule: NameRule) -> Result<(), ConfigErrorKind> {
    let ok = match rule {
        NameRule::Dns1035Label => {
            is_dns1123_label(value) && value.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        }
        NameRule::Dns1123Label => is_dns1123_label(value),
        NameRule::Dns1123Subdomain => value.len() <= 253 && value.split('.').all(is_dns1123_label),
        NameRule::LabelValue => {
            value.is_empty()
                || (value.len() <= 63
                    && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                    && value.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                    && value.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric()))
        }
    };
    if ok { Ok(()) } else { Err(ConfigErrorKind::InvalidName { name: shown(value), rule: rule.describe() }) }
}

fn is_dns1123_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// The longest prefix of a name an error message repeats.
const SHOWN_CHARS: usize = 80;

/// `value`, cut to [`SHOWN_CHARS`] characters with its full length noted,
/// so that an error about a huge name is not itself huge.
pub fn shown(value: &str) -> String {
    match value.char_indices().nth(SHOWN_CHARS) {
        None => value.to_owned(),
        Some((cut, _)) => format!("{}... ({} bytes)", &value[..cut], value.len()),
    }
}

/// What an endpoint address is, for the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressUse {
    Fine,
    /// Allowed, with a warning: a backend there is most likely a mistake
    /// (or an attempt to reach the cloud metadata service).
    LinkLocal,
}

/// Refuses addresses no connection can go to (unspecified, multicast,
/// broadcast); flags link-local ones.
pub fn endpoint_address(ip: IpAddr) -> Result<AddressUse, ConfigErrorKind> {
    let refused = match ip {
        IpAddr::V4(v4) => v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
    };
    if refused {
        return Err(ConfigErrorKind::UnusableEndpointAddress(ip));
    }
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    Ok(if link_local { AddressUse::LinkLocal } else { AddressUse::Fine })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_follow_dns_1035() {
        for good in ["web", "a", "web-2", &"a".repeat(63)] {
            assert!(check_name(good, NameRule::Dns1035Label).is_ok(), "{good}");
        }
        for bad in ["", "2web", "Web", "web-", "we_b", "web.x", "x\"}\n", &"a".repeat(64)] {
            assert!(check_name(bad, NameRule::Dns1035Label).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn namespaces_follow_dns_1123_labels_and_slice_names_subdomains() {
        assert!(check_name("2ns", NameRule::Dns1123Label).is_ok());
        assert!(check_name("ns.x", NameRule::Dns1123Label).is_err());
        assert!(check_name("web-abc12.x", NameRule::Dns1123Subdomain).is_ok());
        assert!(check_name("web..x", NameRule::Dns1123Subdomain).is_err());
        assert!(check_name(&"a.".repeat(127), NameRule::Dns1123Subdomain).is_err());
    }

    #[test]
    fn label_values_allow_dots_underscores_and_capitals() {
        assert!(check_name("My_web.1", NameRule::LabelValue).is_ok());
        assert!(check_name("_web", NameRule::LabelValue).is_err());
        assert!(check_name("a\nb", NameRule::LabelValue).is_err());
    }

    #[test]
    fn a_megabyte_name_is_refused_with_a_short_message() {
        let huge = "a".repeat(1 << 20);
        let message = check_name(&huge, NameRule::Dns1035Label).unwrap_err().to_string();
        assert!(message.len() < 400, "{}", message.len());
        assert!(message.contains("1048576 bytes"), "{message}");
    }

    #[test]
    fn unusable_endpoint_addresses_are_refused_and_link_local_flagged() {
        for bad in ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255"] {
            assert!(endpoint_address(bad.parse().unwrap()).is_err(), "{bad}");
        }
        assert_eq!(endpoint_address("169.254.169.254".parse().unwrap()).unwrap(), AddressUse::LinkLocal);
        assert_eq!(endpoint_address("fe80::1".parse().unwrap()).unwrap(), AddressUse::LinkLocal);
        assert_eq!(endpoint_address("127.0.0.1".parse().unwrap()).unwrap(), AddressUse::Fine);
        assert_eq!(endpoint_address("10.1.2.3".parse().unwrap()).unwrap(), AddressUse::Fine);
    }
}
