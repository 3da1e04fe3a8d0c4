//! The one mapping from appliance errors to gRPC status codes. Handlers return
//! [`ApplianceError`]; a `?` in a tonic trait method converts through this `From`.

use tonic::Status;

use crate::error::{ApplianceError, IngestError};

impl From<ApplianceError> for tonic::Status {
    fn from(e: ApplianceError) -> Self {
        let msg = e.to_string();
        match e {
            ApplianceError::Ingest(
                IngestError::IdMismatch { .. }
                | IngestError::TooLarge { .. }
                | IngestError::BadFrame { .. },
            )
            | ApplianceError::InvalidArgument(_) => Status::invalid_argument(msg),
            ApplianceError::Ingest(IngestError::Storage(_) | IngestError::ShuttingDown)
            | ApplianceError::Unavailable(_) => Status::unavailable(msg),
            ApplianceError::Unauthenticated(_) => Status::unauthenticated(msg),
            ApplianceError::NotFound(_) => Status::not_found(msg),
            ApplianceError::AlreadyExists(_) => Status::already_exists(msg),
            ApplianceError::PermissionDenied(_) => Status::permission_denied(msg),
            ApplianceError::FailedPrecondition(_) => Status::failed_precondition(msg),
            ApplianceError::Internal(_) => Status::internal(msg),
            ApplianceError::DataLoss(_) => Status::data_loss(msg),
            ApplianceError::ResourceExhausted(_)
            | ApplianceError::Ingest(IngestError::NoSpace(_)) => Status::resource_exhausted(msg),
        }
    }
}
