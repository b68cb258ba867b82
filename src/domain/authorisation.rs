//! Phase 2 of contact pairing: a pairing authorisation is forwarded to its grantee only if
//! it can work, that is, if the sender issued it and the grantee can use it.

use std::time::Duration;

use super::ids::EndpointId;
use super::message::Timestamp;
use super::refusal::Refusal;

/// Clock skew tolerated on PDA validity dates (Letro backdates its own dates by 5 minutes).
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// The PDA's authority key identifier extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorityKeyId {
    /// No such extension: the PDA names no issuer.
    Absent,
    /// The extension is there but has no `keyIdentifier`.
    WithoutKeyIdentifier,
    /// The issuer's key identifier (for Awala, the SHA-256 of its SPKI).
    KeyIdentifier(Vec<u8>),
}

/// The facts about a PDA (parcel delivery authorisation) that the rules need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PdaFacts {
    /// Who issued it.
    pub authority_key_id: AuthorityKeyId,
    /// Whether it is signed with RSASSA-PSS, the only algorithm Awala uses.
    pub signed_with_rsa_pss: bool,
    /// The subject's (grantee's) key as canonical RSA SPKI DER; `None` if not RSA.
    pub subject_rsa_key_der: Option<Vec<u8>>,
    /// Start of validity.
    pub not_before: Timestamp,
    /// End of validity.
    pub not_after: Timestamp,
}

/// An authorisation that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorisation {
    /// Who authorises: the sender, and the PDA's issuer.
    pub granter: EndpointId,
    /// Who is authorised: the PDA's subject, and the recipient of the completion.
    pub grantee: EndpointId,
}

/// Checks an authorisation sent by `sender`, whose connection params carry
/// `identity_key_der` (canonical RSA SPKI) and a PDA described by `pda`.
/// `signature_verifies` is asked last, since it is the only costly check.
///
/// The original server only required the issuer to be the sender; it failed with a 500
/// on PDAs that were not RSA-PSS signed, had no key identifier or certified a non-RSA
/// key. Beyond it, the identity key must be the granter's, and the PDA must be validly
/// signed by it and currently valid: the grantee could not use it otherwise.
pub fn check_authorisation(
    sender: &str,
    identity_key_der: &[u8],
    pda: &PdaFacts,
    now: Timestamp,
    signature_verifies: impl FnOnce() -> bool,
) -> Result<Authorisation, Refusal> {
    let granter = match &pda.authority_key_id {
        AuthorityKeyId::Absent => return Err(Refusal::NotIssuedBySender),
        AuthorityKeyId::WithoutKeyIdentifier => return Err(Refusal::PdaWithoutKeyIdentifier),
        AuthorityKeyId::KeyIdentifier(id) => EndpointId::from_digest(id),
    };
    // Exact comparison: no case or prefix normalisation, as in the original.
    if granter.as_str() != sender {
        return Err(Refusal::NotIssuedBySender);
    }
    if !pda.signed_with_rsa_pss {
        return Err(Refusal::PdaNotRsaPss);
    }
    let Some(subject_key) = &pda.subject_rsa_key_der else {
        return Err(Refusal::PdaSubjectNotRsa);
    };
    if EndpointId::from_spki_der(identity_key_der) != granter {
        return Err(Refusal::IdentityKeyNotGranter);
    }
    if now.plus(CLOCK_SKEW) < pda.not_before {
        return Err(Refusal::PdaNotYetValid);
    }
    if pda.not_after.plus(CLOCK_SKEW) < now {
        return Err(Refusal::PdaExpired);
    }
    if !signature_verifies() {
        return Err(Refusal::PdaSignatureInvalid);
    }
    Ok(Authorisation {
        granter,
        grantee: EndpointId::from_spki_der(subject_key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    const GRANTER_KEY: &[u8] = b"granter spki";
    const GRANTEE_KEY: &[u8] = b"grantee spki";
    const NOW: Timestamp = Timestamp(1_800_000_000_000);
    const HOUR: i64 = 3_600_000;

    fn sender() -> String {
        EndpointId::from_spki_der(GRANTER_KEY).as_str().to_owned()
    }

    fn pda() -> PdaFacts {
        PdaFacts {
            authority_key_id: AuthorityKeyId::KeyIdentifier(Sha256::digest(GRANTER_KEY).to_vec()),
            signed_with_rsa_pss: true,
            subject_rsa_key_der: Some(GRANTEE_KEY.to_vec()),
            not_before: Timestamp(NOW.0 - HOUR),
            not_after: Timestamp(NOW.0 + HOUR),
        }
    }

    fn check(pda: &PdaFacts, sig: bool) -> Result<Authorisation, Refusal> {
        check_authorisation(&sender(), GRANTER_KEY, pda, NOW, || sig)
    }

    #[test]
    fn a_sound_authorisation_goes_to_the_grantee() {
        assert_eq!(
            check(&pda(), true),
            Ok(Authorisation {
                granter: EndpointId::from_spki_der(GRANTER_KEY),
                grantee: EndpointId::from_spki_der(GRANTEE_KEY),
            })
        );
    }

    #[test]
    fn each_rule() {
        let cases: Vec<(&str, PdaFacts, bool, Refusal)> = vec![
            (
                "no AKI",
                PdaFacts {
                    authority_key_id: AuthorityKeyId::Absent,
                    ..pda()
                },
                true,
                Refusal::NotIssuedBySender,
            ),
            (
                "keyless AKI",
                PdaFacts {
                    authority_key_id: AuthorityKeyId::WithoutKeyIdentifier,
                    ..pda()
                },
                true,
                Refusal::PdaWithoutKeyIdentifier,
            ),
            (
                "other issuer",
                PdaFacts {
                    authority_key_id: AuthorityKeyId::KeyIdentifier(vec![1; 32]),
                    ..pda()
                },
                true,
                Refusal::NotIssuedBySender,
            ),
            (
                "PKCS#1 v1.5",
                PdaFacts {
                    signed_with_rsa_pss: false,
                    ..pda()
                },
                true,
                Refusal::PdaNotRsaPss,
            ),
            (
                "EC subject",
                PdaFacts {
                    subject_rsa_key_der: None,
                    ..pda()
                },
                true,
                Refusal::PdaSubjectNotRsa,
            ),
            (
                "future",
                PdaFacts {
                    not_before: Timestamp(NOW.0 + HOUR),
                    ..pda()
                },
                true,
                Refusal::PdaNotYetValid,
            ),
            (
                "expired",
                PdaFacts {
                    not_after: Timestamp(NOW.0 - HOUR),
                    ..pda()
                },
                true,
                Refusal::PdaExpired,
            ),
            ("bad signature", pda(), false, Refusal::PdaSignatureInvalid),
        ];
        for (what, facts, sig, expected) in cases {
            assert_eq!(check(&facts, sig), Err(expected), "{what}");
        }
        let other_identity = check_authorisation(&sender(), b"someone else", &pda(), NOW, || true);
        assert_eq!(other_identity, Err(Refusal::IdentityKeyNotGranter));
        // The sender id is compared exactly.
        let upper = sender().to_uppercase();
        assert_eq!(
            check_authorisation(&upper, GRANTER_KEY, &pda(), NOW, || true),
            Err(Refusal::NotIssuedBySender)
        );
    }

    #[test]
    fn clock_skew_is_tolerated_both_ways() {
        let skew = i64::try_from(CLOCK_SKEW.as_millis()).expect("small");
        let early = PdaFacts {
            not_before: Timestamp(NOW.0 + skew),
            ..pda()
        };
        assert!(check(&early, true).is_ok());
        let too_early = PdaFacts {
            not_before: Timestamp(NOW.0 + skew + 1),
            ..pda()
        };
        assert_eq!(check(&too_early, true), Err(Refusal::PdaNotYetValid));
        let late = PdaFacts {
            not_after: Timestamp(NOW.0 - skew),
            ..pda()
        };
        assert!(check(&late, true).is_ok());
        let too_late = PdaFacts {
            not_after: Timestamp(NOW.0 - skew - 1),
            ..pda()
        };
        assert_eq!(check(&too_late, true), Err(Refusal::PdaExpired));
    }

    #[test]
    fn the_signature_is_checked_only_when_everything_else_holds() {
        let facts = PdaFacts {
            signed_with_rsa_pss: false,
            ..pda()
        };
        let mut asked = false;
        let _ = check_authorisation(&sender(), GRANTER_KEY, &facts, NOW, || {
            asked = true;
            true
        });
        assert!(!asked);
    }
}
