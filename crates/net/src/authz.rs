//! The one authorization choke point. Every API request passes [`authorize`] with the
//! caller's authenticated identity before any handler runs.

use blixard_core::{EndpointKey, NodeId};

use crate::api::{ApiError, Request};

/// Who is calling, as established from the connection's authenticated endpoint id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// A holder of an admin credential (written into a node's data dir).
    Admin(EndpointKey),
    /// A cluster member, acting as a host.
    Node(NodeId, EndpointKey),
    /// Anyone else: authenticated (the key is real) but unknown to the cluster.
    Anonymous(EndpointKey),
}

impl Principal {
    pub fn key(&self) -> &EndpointKey {
        match self {
            Principal::Admin(k) | Principal::Node(_, k) | Principal::Anonymous(k) => k,
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Admin(k) => write!(f, "admin {k}"),
            Principal::Node(n, _) => write!(f, "node {n}"),
            Principal::Anonymous(k) => write!(f, "unknown key {k}"),
        }
    }
}

/// Decides whether `principal` may make `request`.
///
/// Members and admins may make every request. Anyone else may only ask to join, which
/// the join token inside the request then authorizes.
pub fn authorize(principal: &Principal, request: &Request) -> Result<(), ApiError> {
    let allowed = match principal {
        Principal::Admin(_) | Principal::Node(..) => true,
        Principal::Anonymous(_) => matches!(request, Request::Join(_)),
    };
    if allowed {
        Ok(())
    } else {
        Err(ApiError::Unauthorized {
            caller: principal.to_string(),
            action: request.kind().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{LeaveCluster, StatusRequest};

    #[test]
    fn strangers_may_only_join() {
        let stranger = Principal::Anonymous(EndpointKey([1; 32]));
        let status = Request::Status(StatusRequest::default());
        let leave = Request::Leave(LeaveCluster { node: NodeId(2) });
        assert!(authorize(&stranger, &status).is_err());
        assert!(authorize(&stranger, &leave).is_err());
        assert!(authorize(&Principal::Admin(EndpointKey([2; 32])), &leave).is_ok());
        assert!(authorize(&Principal::Node(NodeId(3), EndpointKey([3; 32])), &status).is_ok());
    }
}
