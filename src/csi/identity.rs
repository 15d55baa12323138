//! The CSI Identity service: the driver's name and version, what it offers, and whether
//! this process can do its job right now.

use tonic::{Request, Response, Status};

use super::proto::csi::{self, plugin_capability};

/// Which services this process runs, for Probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Controller,
    Node,
    AllInOne,
}

/// The Identity service.
pub struct Identity {
    pub driver_name: String,
    pub role: Role,
}

fn service(t: plugin_capability::service::Type) -> csi::PluginCapability {
    csi::PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Identity {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use plugin_capability::service::Type;
        // The same answer from every process of the driver: capabilities belong to the
        // driver, not to one of its processes.
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(Type::ControllerService),
                service(Type::GroupControllerService),
                service(Type::VolumeAccessibilityConstraints),
                service(Type::SnapshotMetadataService),
                csi::PluginCapability {
                    r#type: Some(plugin_capability::Type::VolumeExpansion(
                        plugin_capability::VolumeExpansion {
                            r#type: plugin_capability::volume_expansion::Type::Online as i32,
                        },
                    )),
                },
            ],
        }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        if self.role != Role::Controller {
            if let Some(reason) = super::agent::ublk_unready() {
                return Err(Status::failed_precondition(reason));
            }
        }
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}
