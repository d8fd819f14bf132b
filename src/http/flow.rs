//! The one publish flow and the one view flow, shared by the signalling socket and WHIP/WHEP:
//! the room checks, the offer rate limit, answering the offer and committing it happen here,
//! in this order, for every transport. The transports only check their credential, parse their
//! request and reply (JSON on the socket, HTTP for WHIP/WHEP).

use std::net::IpAddr;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::Notify;
use tracing::warn;

use super::limits::OfferRefused;
use super::room_views::HeldView;
use super::{fail, rooms, too_many_offers, App, Refusal};
use crate::auth::jwt::RoomBinding;
use crate::auth::jwt::Scope;
use crate::auth::tokens::Tokens;
use crate::edge::events::ViewerEvent;
use crate::edge::{Edge, PendingViewer, ViewOptions};
use crate::origin::{Owner, Published};
use crate::recording::{RecordAsk, RecordError};
use crate::room::state::RoomError;
use crate::rtc::offer::OfferError;
use crate::rtc::peers::PeerId;

/// Why a publication or a view was refused. WHIP and WHEP answer with [`FlowError::status`],
/// the signalling socket with the message.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FlowError {
    #[error("this is an edge: publish at the origin")]
    NotAnOrigin,
    #[error("this origin serves no viewers: view at an edge (chorus edge)")]
    NotAnEdge,
    /// The stream's lease is not this origin's now (lost to another, or unconfirmed for its
    /// whole life during a registry outage).
    #[error("this origin no longer holds stream {0:?} (its lease was lost or could not be renewed): publish again through the director")]
    NotOwner(String),
    /// A room's rule: not this member's source, demoted, removed, audio only.
    #[error(transparent)]
    Room(#[from] RoomError),
    #[error(transparent)]
    TooManyOffers(#[from] OfferRefused),
    #[error(transparent)]
    Offer(#[from] OfferError),
    #[error(transparent)]
    Record(#[from] RecordError),
}

impl FlowError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            FlowError::NotAnOrigin | FlowError::NotAnEdge => StatusCode::NOT_FOUND,
            FlowError::Room(_) | FlowError::Record(RecordError::NotAllowed) => {
                StatusCode::FORBIDDEN
            }
            FlowError::Record(RecordError::NoDataDir) => StatusCode::BAD_REQUEST,
            FlowError::Record(RecordError::Busy) => StatusCode::SERVICE_UNAVAILABLE,
            FlowError::NotOwner(_) => StatusCode::CONFLICT,
            FlowError::TooManyOffers(_) => StatusCode::TOO_MANY_REQUESTS,
            // A refused offer is the client's fault unless it may clear or broke on our side.
            FlowError::Offer(e) => match e {
                OfferError::Malformed(_)
                | OfferError::Unacceptable(_)
                | OfferError::Rejected(_) => StatusCode::BAD_REQUEST,
                OfferError::Limit(_) => StatusCode::SERVICE_UNAVAILABLE,
                OfferError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }
}

impl IntoResponse for FlowError {
    fn into_response(self) -> Response {
        match self {
            FlowError::TooManyOffers(e) => too_many_offers(e),
            other => fail(other.status(), other),
        }
    }
}

/// The token policy's answer for `scope` on `stream` (401 with its reason when it refuses).
pub(crate) fn check_policy(
    tokens: &Tokens,
    token: Option<&str>,
    stream: &str,
    scope: Scope,
) -> Result<(), Refusal> {
    match scope {
        Scope::Publish => tokens.check_publish(token, stream),
        Scope::Subscribe => tokens.check_subscribe(token, stream),
    }
    .map_err(|e| Refusal(StatusCode::UNAUTHORIZED, e.to_string()))
}

/// Who may publish or view `stream` with this bearer where the origin's policy is (the
/// director): a room credential for the stream's room, bound to its member, or else the token
/// policy. WHIP and WHEP ([`super::sdp_request`]) also take a director JWT in between.
pub(crate) fn authorize(
    app: &App,
    tokens: &Tokens,
    token: Option<&str>,
    stream: &str,
    scope: Scope,
) -> Result<Option<RoomBinding>, Refusal> {
    if let Some(grant) = rooms::room_grant(app, token, stream, scope) {
        return grant;
    }
    check_policy(tokens, token, stream, scope)?;
    Ok(None)
}

/// A publication asked for, its credential checked by its transport.
pub(crate) struct PublishAsk<'a> {
    pub stream: &'a str,
    /// None: the stream's main source.
    pub source: Option<String>,
    pub offer: &'a str,
    /// The room member the credential binds the publication to.
    pub room: Option<&'a RoomBinding>,
    pub owner: Owner,
    pub peer: IpAddr,
    /// Redundant ingest: the feed of highest priority plays (0 when none was asked).
    pub priority: i32,
    /// Recording: what was asked and what the credential allows.
    pub record: RecordAsk,
}

/// Publishes: a room member's rules, the offer rate limit, the origin's answer; a member
/// demoted meanwhile is stopped again at once.
pub(crate) fn publish(app: &App, ask: PublishAsk<'_>) -> Result<Published, FlowError> {
    let origin = app.origin.as_ref().ok_or(FlowError::NotAnOrigin)?;
    // The transports took or checked the lease before (the `/ws` upgrade, WHIP); it may have
    // been lost since.
    if !app.cluster.holds_now(ask.stream) {
        return Err(FlowError::NotOwner(ask.stream.to_owned()));
    }
    if let Some(b) = ask.room {
        rooms::check_room_publish(app, b, ask.source.as_deref(), ask.offer)?;
    }
    let record = ask.record.decide(origin.recorder().is_some())?;
    if ask.record.asked.is_none() && ask.record.by_default && origin.recorder().is_none() {
        warn!(
            stream = ask.stream,
            "the token records by default, but this origin has no --data-dir: not recorded"
        );
    }
    app.take_offer(ask.peer)?;
    let published = origin.publish(
        ask.stream,
        ask.source,
        ask.offer,
        ask.owner,
        ask.priority,
        record,
    )?;
    if let Some(b) = ask.room {
        rooms::confirm_room_publish(app, b)?;
    }
    Ok(published)
}

/// How a room's removal of the viewing participant ends this view.
pub(crate) enum Ender {
    /// The signalling session (its id) is told to close.
    Session(u64, Arc<Notify>),
    /// The WHEP viewer is removed.
    Whep,
}

/// A view asked for, its credential checked by its transport.
pub(crate) struct ViewAsk<'a> {
    pub stream: &'a str,
    pub offer: &'a str,
    pub opts: ViewOptions,
    /// The room participant the credential binds the view to.
    pub room: Option<&'a RoomBinding>,
    pub ender: Ender,
    pub peer: IpAddr,
    /// Where the viewer's events go (WHEP: nowhere).
    pub events: UnboundedSender<ViewerEvent>,
}

/// A view answered by the edge, to commit once its answer is sent.
pub(crate) struct PreparedView<'a> {
    edge: &'a Edge,
    pub pending: PendingViewer,
}

impl PreparedView<'_> {
    /// The second half of a view, once answered: the viewer goes live (its first events
    /// follow the answer).
    pub(crate) fn commit(self) -> PeerId {
        self.edge.commit(self.pending)
    }
}

/// The first half of a view: a removed participant refused, the offer rate limit, the edge's
/// answer, and the view registered with its room before it is answered (a removal from then on
/// ends it; a refused one's uncommitted viewer is just dropped). The transport replies, then
/// commits.
pub(crate) fn prepare_view<'a>(
    app: &'a App,
    ask: ViewAsk<'_>,
) -> Result<PreparedView<'a>, FlowError> {
    let edge = app.edge.as_deref().ok_or(FlowError::NotAnEdge)?;
    if let Some(b) = ask.room {
        app.room_views.check(&b.room, &b.member_id)?;
    }
    app.take_offer(ask.peer)?;
    let pending = edge.prepare(ask.stream, ask.offer, ask.opts, ask.events)?;
    if let Some(b) = ask.room {
        let view = match ask.ender {
            Ender::Session(sid, removed) => HeldView::Session(sid, removed),
            Ender::Whep => HeldView::Whep(pending.id()),
        };
        app.room_views.add(&b.room, &b.member_id, view)?;
    }
    Ok(PreparedView { edge, pending })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// WHIP and WHEP keep the statuses their clients and tests rely on.
    #[test]
    fn refusals_keep_their_http_statuses() {
        let cases = [
            (FlowError::NotAnOrigin, StatusCode::NOT_FOUND),
            (FlowError::NotAnEdge, StatusCode::NOT_FOUND),
            (FlowError::NotOwner("s".into()), StatusCode::CONFLICT),
            (
                FlowError::Room(RoomError::AudioOnly("m-1".into())),
                StatusCode::FORBIDDEN,
            ),
            (
                FlowError::Offer(OfferError::Malformed("x".into())),
                StatusCode::BAD_REQUEST,
            ),
            (
                FlowError::Offer(OfferError::Limit("x".into())),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                FlowError::Offer(OfferError::Internal("x".into())),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (e, status) in cases {
            assert_eq!(e.status(), status, "{e}");
            assert_eq!(e.into_response().status(), status);
        }
        let room = FlowError::Room(RoomError::AudioOnly("m-1".into()));
        assert_eq!(
            room.to_string(),
            "member \"m-1\" may publish audio only (mediaAllowed \"audio-only\"): offer no video"
        );
    }
}
