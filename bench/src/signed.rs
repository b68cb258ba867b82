//! Signed pairing requests (today's Letro apps), made fresh with the `veraid` crate's
//! mock DNSSEC hierarchy, which the server under test trusts through
//! `--veraid-trust-anchors`.

use std::path::Path;

use letro_server::bundles::LETRO_SERVICE_OID;
use letro_server::codec::contact_pairing::{
    CONTACT_PAIRING_REQUEST_TYPE, encode_contact_pairing_request,
};
use letro_testkit::load::render_event;
use veraid::Period;
use veraid::testing::{KeyPair, MockHierarchy, Organisation, SigningMember};

use crate::keys::BenchKey;
use crate::sink::CountingSink;

const DAY: i64 = 86_400;

/// A mock VeraId world: one root, organisations under `bench.test`, one RSA key shared
/// by every organisation and one by every member (the server verifies signatures; who
/// holds which key does not change its work).
pub(crate) struct SignedWorld {
    hierarchy: MockHierarchy,
    organisation_key: KeyPair,
    member_key: KeyPair,
    now: i64,
}

/// Signed requests ready to send, and who must get which bundle.
pub(crate) struct SignedRequests {
    /// Rendered HTTP requests, both halves of every pair.
    pub(crate) requests: Vec<Vec<u8>>,
    /// (recipient endpoint id, bundle) of every forward a match must cause.
    forwards: Vec<(String, Vec<u8>)>,
}

impl SignedRequests {
    /// Whether every party got the other's bundle exactly once.
    pub(crate) fn all_forwarded(&self, sink: &CountingSink) -> bool {
        self.forwards
            .iter()
            .all(|(recipient, bundle)| sink.forwarded_once(recipient, bundle))
    }
}

/// A request to sign: its signer, the member's organisation, the sender's key, its target.
struct Draft<'a> {
    organisation: Organisation,
    user: String,
    /// The signer's certificate, where it signs more than this request.
    member: Option<SigningMember>,
    key: &'a BenchKey,
    target: String,
    parcel: String,
}

impl SignedWorld {
    pub(crate) fn new() -> Self {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        Self {
            hierarchy: MockHierarchy::new(now),
            organisation_key: KeyPair::generate(2048),
            member_key: KeyPair::generate(2048),
            now,
        }
    }

    /// Writes the mock root's trust anchor to `path`, for `--veraid-trust-anchors`.
    pub(crate) fn write_anchors(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.hierarchy.trust_anchors_text())
    }

    fn organisation(&mut self, name: &str) -> Organisation {
        self.hierarchy
            .organisation(name, self.organisation_key.clone())
    }

    /// `pairs` pairs, every party a member of one organisation named after `tag`: its
    /// chain is validated on the first request and remembered for the rest. Every
    /// member is new, so its certificate is checked, as for a user's first request.
    pub(crate) fn one_organisation(
        &mut self,
        keys: &[BenchKey],
        tag: &str,
        pairs: usize,
    ) -> SignedRequests {
        let organisation = self.organisation(&format!("{tag}.bench.test"));
        let users = (0..pairs).map(|i| (i, i)).collect();
        self.make(keys, tag, users, |_| organisation.clone(), false)
    }

    /// `pairs` pairs among `members` users on each side of one organisation, each user
    /// signing about `pairs / members` requests with one certificate: after its first
    /// request, a user's certificate is remembered too, as for a user pairing with
    /// several contacts.
    pub(crate) fn returning_members(
        &mut self,
        keys: &[BenchKey],
        tag: &str,
        pairs: usize,
        members: usize,
    ) -> SignedRequests {
        let organisation = self.organisation(&format!("{tag}.bench.test"));
        let members = members.max(1);
        // Distinct (a, b) for up to members² pairs.
        let users = (0..pairs.min(members * members))
            .map(|i| (i % members, i / members))
            .collect();
        self.make(keys, tag, users, |_| organisation.clone(), true)
    }

    /// `pairs` pairs, every request from an organisation of its own: nothing about it can
    /// have been remembered.
    pub(crate) fn new_organisations(
        &mut self,
        keys: &[BenchKey],
        tag: &str,
        pairs: usize,
    ) -> SignedRequests {
        let organisations: Vec<Organisation> = (0..2 * pairs)
            .map(|n| self.organisation(&format!("o{n}.{tag}.bench.test")))
            .collect();
        let users = (0..pairs).map(|i| (i, i)).collect();
        self.make(keys, tag, users, |n| organisations[n].clone(), false)
    }

    /// Both halves of each pair `i` of `users` (`(x, y)`): `a{x}` asks for `b{y}` and
    /// back, the `n`th request signed by a member of `organisation(n)`, each user with
    /// one certificate for all its requests if `returning`. Signing takes a few
    /// milliseconds a request, so it runs on every core.
    fn make(
        &self,
        keys: &[BenchKey],
        tag: &str,
        users: Vec<(usize, usize)>,
        organisation: impl Fn(usize) -> Organisation,
        returning: bool,
    ) -> SignedRequests {
        let mut members = std::collections::HashMap::<String, SigningMember>::new();
        let mut member = |organisation: &Organisation, user: &str| {
            returning.then(|| {
                members
                    .entry(format!("{user}@{}", organisation.name()))
                    .or_insert_with(|| {
                        organisation.member(Some(user), self.member_key.clone(), self.now)
                    })
                    .clone()
            })
        };
        let mut drafts = Vec::with_capacity(2 * users.len());
        for (i, &(x, y)) in users.iter().enumerate() {
            let (a, b) = (2 * i, 2 * i + 1);
            let (oa, ob) = (organisation(a), organisation(b));
            let (ua, ub) = (format!("a{x}"), format!("b{y}"));
            let (ida, idb) = (format!("{ua}@{}", oa.name()), format!("{ub}@{}", ob.name()));
            drafts.push(Draft {
                member: member(&oa, &ua),
                organisation: oa,
                user: ua,
                key: &keys[a % keys.len()],
                target: idb.clone(),
                parcel: crate::parcel_id(&format!("{tag}-A{i}")),
            });
            drafts.push(Draft {
                member: member(&ob, &ub),
                organisation: ob,
                user: ub,
                key: &keys[b % keys.len()],
                target: ida,
                parcel: crate::parcel_id(&format!("{tag}-B{i}")),
            });
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = drafts.len().div_ceil(threads).max(1);
        let bundles: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let workers: Vec<_> = drafts
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || part.iter().map(|d| self.sign(d)).collect::<Vec<_>>())
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect::<Vec<Vec<u8>>>()
        });
        let requests = drafts
            .iter()
            .zip(&bundles)
            .map(|(d, bundle)| {
                render_event(
                    "/",
                    d.key.id.as_str(),
                    &d.parcel,
                    crate::SERVER_ID,
                    CONTACT_PAIRING_REQUEST_TYPE,
                    bundle,
                )
            })
            .collect();
        // Each half goes to the other half's sender.
        let forwards = bundles
            .chunks(2)
            .zip(drafts.chunks(2))
            .flat_map(|(b, d)| {
                [
                    (d[1].key.id.as_str().to_owned(), b[0].clone()),
                    (d[0].key.id.as_str().to_owned(), b[1].clone()),
                ]
            })
            .collect();
        SignedRequests { requests, forwards }
    }

    fn sign(&self, draft: &Draft<'_>) -> Vec<u8> {
        let key = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            &draft.key.spki_b64,
        )
        .unwrap_or_default();
        let plaintext = encode_contact_pairing_request(&key, &draft.target);
        let member = draft.member.clone().unwrap_or_else(|| {
            draft
                .organisation
                .member(Some(&draft.user), self.member_key.clone(), self.now)
        });
        member.sign(
            &plaintext,
            LETRO_SERVICE_OID,
            Period::new(self.now - 60, self.now + DAY),
        )
    }
}
