//! Real rustls handshakes, in memory, between the configurations of
//! [`crate::tls`], with certificates from [`crate::ca`].

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

use crate::ca::{Authority, CaMaterial};
use crate::tls::{self, Credentials, Current, Rejection};
use crate::{KeyAndCsr, SpiffeId, TrustDomain};

fn td(s: &str) -> TrustDomain {
    s.parse().unwrap()
}

type Issued = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn issue(ca: &Authority, ns: &str, svc: &str, ttl: Duration) -> Issued {
    let id = SpiffeId::workload(ca.trust_domain(), ns, svc).unwrap();
    let kc = KeyAndCsr::generate().unwrap();
    let csr = crate::ca::Csr::parse(&kc.csr).unwrap();
    let issued = ca.issue(&csr, &id, ttl).unwrap();
    (issued.chain, kc.key)
}

fn creds_for(ca: &Authority, ns: &str, svc: &str, ttl: Duration) -> Arc<Credentials> {
    let (chain, key) = issue(ca, ns, svc, ttl);
    Credentials::new(Current::new(chain, key, ca.roots()).unwrap())
}

/// Run a handshake to its end; the error of whichever side failed first.
fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut c = ClientConnection::new(client, name).unwrap();
    let mut s = ServerConnection::new(server).unwrap();
    for _ in 0..10 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
        }
        let server_result = s.process_new_packets();
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        server_result?;
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
        }
        c.process_new_packets()?;
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok((c, s));
        }
    }
    panic!("the handshake did not finish");
}

fn rejection(r: Result<(ClientConnection, ServerConnection), rustls::Error>) -> Rejection {
    match r {
        Ok(_) => panic!("the handshake succeeded"),
        Err(e) => tls::rejection(&e),
    }
}

#[test]
fn peers_of_one_mesh_handshake_and_see_each_others_ids() {
    let ca = Authority::generate(&td("cluster.local")).unwrap();
    let server = creds_for(&ca, "default", "reviews", Duration::from_secs(3600));
    let client = creds_for(&ca, "default", "productpage", Duration::from_secs(3600));
    let expected = server.current().id.clone();
    let (c, s) = handshake(
        tls::peer_client(&client, expected),
        tls::inbound_server(&server),
    )
    .unwrap();
    assert_eq!(
        tls::peer_id(s.peer_certificates()).unwrap().to_string(),
        "spiffe://cluster.local/ns/default/sa/productpage"
    );
    assert_eq!(
        tls::peer_id(c.peer_certificates()).unwrap().to_string(),
        "spiffe://cluster.local/ns/default/sa/reviews"
    );
    assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
}

#[test]
fn a_peer_with_another_id_than_expected_is_refused() {
    let ca = Authority::generate(&td("cluster.local")).unwrap();
    let server = creds_for(&ca, "default", "ratings", Duration::from_secs(3600));
    let client = creds_for(&ca, "default", "productpage", Duration::from_secs(3600));
    let expected = SpiffeId::workload(ca.trust_domain(), "default", "reviews").unwrap();
    let r = handshake(
        tls::peer_client(&client, expected),
        tls::inbound_server(&server),
    );
    assert_eq!(rejection(r), Rejection::WrongIdentity);
}

#[test]
fn clients_of_another_ca_or_trust_domain_or_expired_are_refused() {
    let ca = Authority::generate(&td("cluster.local")).unwrap();
    let server = creds_for(&ca, "default", "reviews", Duration::from_secs(3600));
    let expected = server.current().id.clone();

    let other = Authority::generate(&td("cluster.local")).unwrap();
    // The stranger trusts our CA (so its side of the handshake passes)
    // but holds a certificate of another CA.
    let (chain, key) = issue(&other, "default", "productpage", Duration::from_secs(3600));
    let stranger = Credentials::new(Current::new(chain, key, ca.roots()).unwrap());
    let r = handshake(
        tls::peer_client(&stranger, expected.clone()),
        tls::inbound_server(&server),
    );
    assert_eq!(rejection(r), Rejection::UnknownCa);

    // Same CA key, another trust domain in the SPIFFE ID.
    let material = ca.material().clone();
    let foreign = Authority::from_material(&td("example.org"), material).unwrap();
    let outsider = creds_for(
        &foreign,
        "default",
        "productpage",
        Duration::from_secs(3600),
    );
    let r = handshake(
        tls::peer_client(&outsider, expected.clone()),
        tls::inbound_server(&server),
    );
    assert_eq!(rejection(r), Rejection::TrustDomain);

    // Issued with no lifetime: expired once the clock passes its
    // notAfter (X.509 times are whole seconds).
    let late = creds_for(&ca, "default", "productpage", Duration::from_secs(0));
    let not_after = late.current().leaf.not_after;
    while std::time::SystemTime::now() <= not_after + Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = handshake(
        tls::peer_client(&late, expected),
        tls::inbound_server(&server),
    );
    assert_eq!(rejection(r), Rejection::Expired);
}

#[test]
fn bootstrap_trusts_only_the_pinned_root() {
    let ca = Authority::generate(&td("cluster.local")).unwrap();
    let control = control_creds(&ca);
    assert!(
        handshake(
            tls::bootstrap_client(ca.pin()),
            tls::control_server(&control)
        )
        .is_ok()
    );
    let other = Authority::generate(&td("cluster.local")).unwrap();
    let r = handshake(
        tls::bootstrap_client(other.pin()),
        tls::control_server(&control),
    );
    assert_eq!(rejection(r), Rejection::PinMismatch);
    // A workload of the mesh is not control, even under the right root.
    let workload = creds_for(&ca, "default", "reviews", Duration::from_secs(3600));
    let r = handshake(
        tls::bootstrap_client(ca.pin()),
        tls::inbound_server(&workload),
    );
    assert!(r.is_err());
}

fn control_creds(ca: &Authority) -> Arc<Credentials> {
    let (issued, key) = ca
        .issue_server(&["localhost".into()], &[], Duration::from_secs(3600))
        .unwrap();
    Credentials::new(Current::new(issued.chain, key, ca.roots()).unwrap())
}

#[test]
fn an_operator_intermediate_issues_under_its_root() {
    // The operator's root, and an intermediate it signed.
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root_cert = root.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(root.clone(), &root_key);
    let mid_key = rcgen::KeyPair::generate().unwrap();
    let mut mid = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    mid.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let mid_cert = mid.signed_by(&mid_key, &root_issuer).unwrap();
    let ca = Authority::from_material(
        &td("cluster.local"),
        CaMaterial {
            chain_pem: mid_cert.pem(),
            key_pem: mid_key.serialize_pem(),
            roots_pem: root_cert.pem(),
        },
    )
    .unwrap();
    assert_eq!(
        ca.roots(),
        &[CertificateDer::from(root_cert.der().to_vec())]
    );
    let a = creds_for(&ca, "default", "a", Duration::from_secs(3600));
    let b = creds_for(&ca, "default", "b", Duration::from_secs(3600));
    let expected = b.current().id.clone();
    handshake(tls::peer_client(&a, expected), tls::inbound_server(&b)).unwrap();

    // The intermediate's key must be its own; the chain must reach the root.
    let wrong_key = Authority::from_material(
        &td("cluster.local"),
        CaMaterial {
            chain_pem: mid_cert.pem(),
            key_pem: root_key.serialize_pem(),
            roots_pem: root_cert.pem(),
        },
    )
    .unwrap_err();
    assert!(
        wrong_key.to_string().contains("does not belong"),
        "{wrong_key}"
    );
    let other_root = Authority::generate(&td("cluster.local")).unwrap();
    let unanchored = Authority::from_material(
        &td("cluster.local"),
        CaMaterial {
            chain_pem: mid_cert.pem(),
            key_pem: mid_key.serialize_pem(),
            roots_pem: other_root.roots_pem().to_string(),
        },
    )
    .unwrap_err();
    assert!(
        unanchored.to_string().contains("does not chain"),
        "{unanchored}"
    );
}
