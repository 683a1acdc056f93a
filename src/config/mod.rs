//! TEMPORARY stub of the config API (replaced by the config-wip branch).
use crate::model;
use std::path::Path;

#[derive(Debug, Default)]
pub struct Manifests {
    pub services: Vec<model::Service>,
    pub slices: Vec<model::EndpointSlice>,
    pub warnings: Vec<String>,
}
#[derive(Debug, thiserror::Error)]
#[error("config error: {0}")]
pub struct ConfigError(pub String);
#[derive(Debug, thiserror::Error)]
#[error("config errors: {0:?}")]
pub struct ConfigErrors(pub Vec<ConfigError>);
impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}
pub fn load_path(_path: &Path) -> Result<Manifests, ConfigErrors> {
    Ok(Manifests::default())
}
pub fn join(
    _s: &[model::Service],
    _e: &[model::EndpointSlice],
) -> (Vec<model::ServicePort>, Vec<ConfigError>) {
    (vec![], vec![])
}
