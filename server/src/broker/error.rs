//! The broker's one error type, and the one place it becomes an OAuth
//! error response (RFC 6749 §5.2, RFC 8693, RFC 9396, RFC 8628): the
//! `error` code is what programs act on, `error_description` the words.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::records::BrokerRefusal;

/// Why the broker refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// A parameter is missing, repeated, malformed or too large.
    #[error("{0}")]
    InvalidRequest(String),
    /// The caller's own credential (client certificate, client assertion) failed.
    #[error("{0}")]
    InvalidClient(String),
    /// The subject or actor token (a JWT-SVID) is not valid now: expired,
    /// revoked, wrong audience, foreign trust domain, bad signature; or the
    /// task cannot be used.
    #[error("{0}")]
    InvalidGrant(String),
    /// Not the token-exchange grant.
    #[error("unsupported grant_type {0:?}: this broker speaks urn:ietf:params:oauth:grant-type:token-exchange")]
    UnsupportedGrantType(String),
    /// No action named, or a scope that does not parse.
    #[error("{0}")]
    InvalidScope(String),
    /// The audience/resource does not name one tool.
    #[error("{0}")]
    InvalidTarget(String),
    /// `authorization_details` does not parse or has an unknown type.
    #[error("{0}")]
    InvalidDetails(String),
    /// Policy (or an operator) refused the request.
    #[error("{0}")]
    AccessDenied(String),
    /// The request waits for an operator's approval.
    #[error(
        "request {request_id} waits for an operator's approval ({why}); poll again in {interval} s"
    )]
    Pending {
        /// The held request.
        request_id: String,
        /// Seconds to wait between polls.
        interval: u32,
        /// Why approval is needed.
        why: String,
    },
    /// A held request polled sooner than its interval (RFC 8628 §3.5):
    /// wait `interval` seconds (5 more than before) between polls.
    #[error("request {request_id} was polled too soon; poll every {interval} s")]
    SlowDown {
        /// The held request.
        request_id: String,
        /// The interval from now on.
        interval: u32,
    },
    /// The held request (or its approval) lapsed.
    #[error("{0}")]
    Expired(String),
    /// The body is larger than the broker reads.
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    /// The broker could not complete the request (store, signing).
    #[error("{0}")]
    Internal(String),
}

impl BrokerError {
    /// The OAuth `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) | Self::TooLarge(_) => "invalid_request",
            Self::InvalidClient(_) => "invalid_client",
            Self::InvalidGrant(_) => "invalid_grant",
            Self::UnsupportedGrantType(_) => "unsupported_grant_type",
            Self::InvalidScope(_) => "invalid_scope",
            Self::InvalidTarget(_) => "invalid_target",
            Self::InvalidDetails(_) => "invalid_authorization_details",
            Self::AccessDenied(_) => "access_denied",
            Self::Pending { .. } => "authorization_pending",
            Self::SlowDown { .. } => "slow_down",
            Self::Expired(_) => "expired_token",
            Self::Internal(_) => "server_error",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidClient(_) => StatusCode::UNAUTHORIZED,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl From<BrokerRefusal> for BrokerError {
    fn from(r: BrokerRefusal) -> Self {
        match r {
            BrokerRefusal::RequestExpired(_) => Self::Expired(r.to_string()),
            BrokerRefusal::ContentChanged { .. } => Self::InvalidRequest(r.to_string()),
            BrokerRefusal::RequestState { state: super::records::RequestState::Denied, .. } => {
                Self::AccessDenied(r.to_string())
            }
            _ => Self::InvalidGrant(r.to_string()),
        }
    }
}

impl From<crate::store::StoreError> for BrokerError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Internal(format!("store: {e}"))
    }
}

impl IntoResponse for BrokerError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({
            "error": self.code(),
            "error_description": one_line(&self.to_string()),
        });
        if let Self::Pending { request_id, interval, .. }
        | Self::SlowDown { request_id, interval } = &self
        {
            body["interval"] = (*interval).into();
            body["request_id"] = request_id.clone().into();
        }
        let mut response = (self.status(), axum::Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if matches!(self, Self::InvalidClient(_)) {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tessera-broker\""),
            );
        }
        response
    }
}

/// Text on one line, at most 512 characters (descriptions echo input).
pub fn one_line(s: &str) -> String {
    let mut out: String =
        s.chars().map(|c| if c.is_control() { ' ' } else { c }).take(512).collect();
    if s.chars().count() > 512 {
        out.push('…');
    }
    out
}
