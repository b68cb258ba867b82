//! Why a well-formed event's content was refused. Refusals are expected outcomes, not
//! errors: the event is acknowledged (204) so that nobody redelivers it, and the reason
//! is logged and counted.

/// A reason to refuse the content of an incoming service message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Refusal {
    /// The content is larger than any real pairing request.
    #[error("content too large")]
    TooLarge,
    /// The content is not UTF-8 text.
    #[error("content is not UTF-8")]
    NotUtf8,
    /// The request does not have exactly three comma-separated fields.
    #[error("wrong number of fields")]
    FieldCount,
    /// The requester is not a VeraId user id.
    #[error("invalid requester VeraId")]
    InvalidRequester,
    /// The target is not a VeraId user id.
    #[error("invalid target VeraId")]
    InvalidTarget,
    /// Requester and target are the same user.
    #[error("requester and target are the same")]
    SelfPairing,
    /// The key is not strict standard base64.
    #[error("key is not base64")]
    KeyNotBase64,
    /// The key is not a DER SubjectPublicKeyInfo.
    #[error("key is not a DER SubjectPublicKeyInfo")]
    KeyNotSpki,
    /// The key is not an RSA key.
    #[error("key is not an RSA key")]
    KeyNotRsa,
    /// The key does not hash to the sender's endpoint id.
    #[error("key does not belong to the sender")]
    KeyNotSender,
    /// The sender already has as many requests waiting as it may.
    #[error("too many pending requests from this endpoint")]
    SenderPendingLimit,
    /// The target already has as many requests waiting for it as it may.
    #[error("too many pending requests for this target")]
    TargetPendingLimit,
    /// The request would have to wait, and the live pending requests have reached the
    /// operator's ceiling (`--max-pending-requests`). Unlike the other refusals it is
    /// answered 503, not acknowledged: the broker redelivers it, and it gets in once
    /// matches and expiry make room.
    #[error("the pending requests have reached their ceiling")]
    PendingCeiling,
    /// The request would replace one sent from another endpoint, and the operator
    /// chose to refuse that.
    #[error("would replace a pending request from another endpoint")]
    ReplacesOtherEndpoint,
    /// The content is not Awala connection params in DER.
    #[error("connection params are malformed")]
    ParamsMalformed,
    /// The PDA was not issued by the sender (or names no issuer).
    #[error("PDA not issued by the sender")]
    NotIssuedBySender,
    /// The PDA's authority key identifier extension has no key identifier.
    #[error("PDA authority key identifier has no key identifier")]
    PdaWithoutKeyIdentifier,
    /// The PDA is not signed with RSASSA-PSS.
    #[error("PDA is not signed with RSA-PSS")]
    PdaNotRsaPss,
    /// The PDA certifies a key that is not RSA.
    #[error("PDA subject key is not an RSA key")]
    PdaSubjectNotRsa,
    /// The connection params' identity key is not the granter's.
    #[error("identity key is not the granter's")]
    IdentityKeyNotGranter,
    /// The PDA's signature does not verify with the granter's key.
    #[error("PDA signature is invalid")]
    PdaSignatureInvalid,
    /// The PDA has expired.
    #[error("PDA has expired")]
    PdaExpired,
    /// The PDA is not valid yet.
    #[error("PDA is not valid yet")]
    PdaNotYetValid,
    /// The VeraId signature bundle does not verify (for Letro, within the last 90 days,
    /// from the configured trust anchors).
    #[error("VeraId signature bundle does not verify")]
    BundleInvalid,
    /// The bundle verifies, but what it signs is not a DER ContactPairingRequest.
    #[error("signed plaintext is not a contact pairing request")]
    NotAContactPairingRequest,
}

impl Refusal {
    /// A stable snake-case name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::NotUtf8 => "not_utf8",
            Self::FieldCount => "field_count",
            Self::InvalidRequester => "invalid_requester",
            Self::InvalidTarget => "invalid_target",
            Self::SelfPairing => "self_pairing",
            Self::KeyNotBase64 => "key_not_base64",
            Self::KeyNotSpki => "key_not_spki",
            Self::KeyNotRsa => "key_not_rsa",
            Self::KeyNotSender => "key_not_sender",
            Self::SenderPendingLimit => "sender_pending_limit",
            Self::TargetPendingLimit => "target_pending_limit",
            Self::PendingCeiling => "pending_ceiling",
            Self::ReplacesOtherEndpoint => "replaces_other_endpoint",
            Self::ParamsMalformed => "params_malformed",
            Self::NotIssuedBySender => "not_issued_by_sender",
            Self::PdaWithoutKeyIdentifier => "pda_without_key_identifier",
            Self::PdaNotRsaPss => "pda_not_rsa_pss",
            Self::PdaSubjectNotRsa => "pda_subject_not_rsa",
            Self::IdentityKeyNotGranter => "identity_key_not_granter",
            Self::PdaSignatureInvalid => "pda_signature_invalid",
            Self::PdaExpired => "pda_expired",
            Self::PdaNotYetValid => "pda_not_yet_valid",
            Self::BundleInvalid => "bundle_invalid",
            Self::NotAContactPairingRequest => "not_a_contact_pairing_request",
        }
    }
}
