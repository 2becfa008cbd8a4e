//! API requests: each [`Request`] answered from (or applied to) the manager's state.

use super::{Job, Manager, Slot};
use crate::api::{ApiError, LoadState, Request, Response, UnitInfo};

impl Manager {
    /// Answer one API request.
    pub fn handle(&mut self, req: Request) -> Result<Response, ApiError> {
        let changes_state = matches!(
            req,
            Request::StartUnit(_) | Request::RestartUnit(_) | Request::LoadUnit { .. }
        );
        if self.shutting_down && changes_state {
            return Err(ApiError::Refused("the manager is shutting down".into()));
        }
        match req {
            Request::ListUnits => Ok(Response::Units(
                self.slots.keys().filter_map(|n| self.info(n)).collect(),
            )),
            Request::GetUnit(name) => self.ensure(&name).map(Response::Unit),
            Request::StartUnit(name) => {
                self.ensure(&name)?;
                self.queue_start(&name, true);
                self.unit_response(&name)
            }
            Request::StopUnit(name) => {
                self.known(&name)?;
                self.queue_stop(&name, Job::Stop);
                self.unit_response(&name)
            }
            Request::RestartUnit(name) => {
                self.ensure(&name)?;
                self.queue_stop(&name, Job::Restart);
                self.unit_response(&name)
            }
            Request::LoadUnit { name, toml } => match self.load_from_api(&name, &toml)? {
                Some(template) => Ok(Response::Unit(template)),
                None => self.unit_response(&name),
            },
            Request::RemoveUnit(name) => {
                self.known(&name)?;
                self.remove(&name);
                Ok(Response::Done)
            }
            Request::Reload { restart_changed } => {
                Ok(Response::Reload(self.reload(restart_changed)))
            }
            Request::Logs {
                name,
                lines,
                after_seq,
            } => {
                let slot = self
                    .slots
                    .get(&name)
                    .ok_or_else(|| ApiError::NoSuchUnit(name.clone()))?;
                Ok(Response::Logs(slot.log.tail(lines as usize, after_seq)))
            }
            Request::CatUnit(name) => {
                self.ensure(&name)?;
                self.units
                    .get(&name)
                    .map(|u| Response::Text(u.source.clone()))
                    .ok_or(ApiError::NoSuchUnit(name))
            }
            Request::ListImages => self.images().map(Response::Images),
            Request::ControlApiGranted(name) => Ok(Response::Granted(
                self.slots.get(&name).is_some_and(Slot::control_api_granted),
            )),
            Request::SystemState => Ok(Response::Text(
                if self.shutting_down {
                    crate::api::SYSTEM_STOPPING
                } else {
                    crate::api::SYSTEM_RUNNING
                }
                .to_string(),
            )),
        }
    }

    /// The images of the manager's image stores (none without a puller: no store).
    fn images(&mut self) -> Result<Vec<crate::api::ImageEntry>, ApiError> {
        let Some(puller) = self.puller.as_mut() else {
            return Ok(Vec::new());
        };
        puller
            .images()
            .map_err(|e| ApiError::Refused(e.to_string()))
    }

    pub(super) fn unit_response(&self, name: &str) -> Result<Response, ApiError> {
        self.info(name)
            .map(Response::Unit)
            .ok_or_else(|| ApiError::NoSuchUnit(name.to_string()))
    }

    pub(super) fn known(&self, name: &str) -> Result<(), ApiError> {
        if self.slots.contains_key(name) {
            Ok(())
        } else {
            Err(ApiError::NoSuchUnit(name.to_string()))
        }
    }

    /// The client-visible record of a unit.
    pub fn info(&self, name: &str) -> Option<UnitInfo> {
        let slot = self.slots.get(name)?;
        let unit = self.units.get(name);
        Some(UnitInfo {
            name: name.to_string(),
            description: unit
                .and_then(|u| u.unit.description.clone())
                .unwrap_or_default(),
            load_state: if slot.load_error().is_some() {
                LoadState::Error.into()
            } else {
                LoadState::Loaded.into()
            },
            active_state: slot.active().into(),
            sub_state: slot.sub().into(),
            main_pid: slot
                .main_pid()
                .map(|p| u32::try_from(p.as_raw()).unwrap_or(0))
                .unwrap_or(0),
            restarts: slot.restarts(),
            exit_code: slot.exit_code().unwrap_or(-1),
            exit_signal: slot.exit_signal().unwrap_or(0),
            since_us: slot.since_us(),
            result: slot.outcome().into(),
            message: match slot.load_error() {
                Some(e) if slot.message().is_empty() => e.to_string(),
                _ => slot.message().to_string(),
            },
        })
    }
}
