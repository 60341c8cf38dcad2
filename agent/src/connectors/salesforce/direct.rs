//! Case messages to Salesforce without a broker, for `edgecase demo`'s in-process queue:
//! the connector's mapping, logins, upsert and answer policy, called directly. There is no
//! dead-letter queue in-process, so a refused case is returned to the caller to report.

use super::client::{self, Account, Outcome, classify};
use super::config::{Division, Resolved};
use super::consumer::{Error, log_in};
use super::mapping::case_record;
use std::sync::Arc;
use std::time::Duration;

pub struct DirectSink {
    http: reqwest::Client,
    api_version: String,
    divisions: Vec<(Division, Arc<Account>)>,
}

impl DirectSink {
    /// Logs every division in.
    pub async fn start(resolved: &Resolved) -> Result<DirectSink, Error> {
        let (http, accounts) = log_in(resolved).await?;
        Ok(DirectSink {
            http,
            api_version: resolved.tenant.api_version.clone(),
            divisions: resolved.divisions.iter().cloned().zip(accounts).collect(),
        })
    }

    /// Upserts one case message for the division whose routing key it carries; `Ok(None)`
    /// when no division takes that routing key. Retries a few times, then gives up.
    pub async fn deliver(&self, routing_key: &str, payload: &[u8]) -> Result<Option<Outcome>, String> {
        let Some((division, account)) = self.divisions.iter().find(|(d, _)| d.routing_key == routing_key) else {
            return Ok(None);
        };
        let record = case_record(payload, &division.config).map_err(|e| e.0)?;
        let mut last = String::new();
        for attempt in 0..5u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200) * attempt).await;
            }
            let session = account.session().await.map_err(|e| e.to_string())?;
            let answer = client::upsert(
                &self.http,
                &session,
                &self.api_version,
                &division.config.external_id_field,
                &record.event_id,
                &record.fields,
                division.config.auto_assign,
            )
            .await;
            match answer.map(|a| classify(a.status, &a.body)) {
                Ok(Outcome::SessionExpired) => {
                    let _ = account.renew(&session).await;
                    last = "session expired".into();
                }
                Ok(Outcome::Retry { reason, .. }) => last = reason,
                Err(e) => last = e,
                Ok(done) => return Ok(Some(done)),
            }
        }
        Err(format!("gave up after 5 tries: {last}"))
    }
}
