//! The error type's Display and the field-level validators.

use crate::config::{
    ConfigError, ConfigErrorKind, ConfigErrors, ObjectRef, port_name, port_number, protocol,
};
use crate::model::{Origin, Protocol, ServiceName};

#[test]
fn error_display_names_origin_object_field_and_problem() {
    let error = ConfigError {
        origin: Origin::new("examples/bad.yaml (document 2)"),
        object: Some(ObjectRef::of("Service", &ServiceName::new("default", "web"))),
        field: Some("spec.ports[0].port".into()),
        kind: port_number(70000).unwrap_err(),
    };
    assert_eq!(
        error.to_string(),
        "examples/bad.yaml (document 2): Service default/web: spec.ports[0].port: \
         70000 is out of range 1-65535"
    );
}

#[test]
fn config_errors_print_one_per_line() {
    let make = |n: &str| ConfigError {
        origin: Origin::new(n),
        object: None,
        field: None,
        kind: ConfigErrorKind::NotAnObject,
    };
    let errors = ConfigErrors::from_vec(vec![make("a"), make("b")]).unwrap();
    assert_eq!(errors.to_string().lines().count(), 2);
    assert!(ConfigErrors::from_vec(Vec::new()).is_none());
}

#[test]
fn port_number_accepts_only_1_to_65535() {
    assert_eq!(port_number(1).ok(), Some(1));
    assert_eq!(port_number(65535).ok(), Some(65535));
    assert!(port_number(0).is_err());
    assert!(port_number(-1).is_err());
    assert!(port_number(65536).is_err());
}

#[test]
fn protocol_defaults_to_tcp_and_rejects_sctp_and_unknowns() {
    assert_eq!(protocol(None).ok(), Some(Protocol::Tcp));
    assert_eq!(protocol(Some("UDP")).ok(), Some(Protocol::Udp));
    let sctp = protocol(Some("SCTP")).unwrap_err().to_string();
    assert_eq!(sctp, "SCTP is not supported");
    let tcpx = protocol(Some("tcp")).unwrap_err().to_string();
    assert!(tcpx.contains("unknown protocol \"tcp\""), "{tcpx}");
}

#[test]
fn port_names_follow_the_kubernetes_rule() {
    assert!(port_name("http").is_ok());
    assert!(port_name("http-alt2").is_ok());
    assert!(port_name("8080").is_err());
    assert!(port_name("Http").is_err());
    assert!(port_name("-http").is_err());
    assert!(port_name("a--b").is_err());
    assert!(port_name("a-very-long-port-name").is_err());
}
