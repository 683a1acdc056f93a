//! The command line's checks and conversions: flag value parsers, and
//! `run`'s and `check`'s flags turned into the library's options (with the
//! validation that needs several flags at once).

use super::*;

pub(super) fn parse_mark(s: &str) -> Result<u32, String> {
    let mark = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?}: {e}"))?;
    if mark == 0 {
        return Err("the mark must not be 0".into());
    }
    Ok(mark)
}

pub(super) fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = s.split_once('-').ok_or("expected FIRST-LAST, e.g. 20000-20999")?;
    let parse = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("{p:?}: {e}"));
    let (a, b) = (parse(a)?, parse(b)?);
    if a == 0 || a > b {
        return Err(format!("{s}: need 1 <= FIRST <= LAST"));
    }
    Ok(a..=b)
}

impl ListenArgs {
    /// What `check` plans with: as `run` with rules (`--redirect auto`),
    /// whose proxy ports listen on the proxy addresses when
    /// `--bind-address` is the IPv4 wildcard, so their conflicts show.
    pub(super) fn check_options(&self, workers: usize) -> ListenOptions {
        let mut opts = self.options(workers);
        if self.bind_address == IpAddr::V4(Ipv4Addr::UNSPECIFIED) {
            opts.bind_address = self.proxy_address.into();
            opts.bind_address6 = Some(self.proxy_address6.into());
        }
        opts
    }

    fn options(&self, workers: usize) -> ListenOptions {
        ListenOptions {
            bind_address: self.bind_address,
            bind_address6: None,
            proxy_port_range: self.proxy_port_range.clone(),
            nodeport_addresses: self.nodeport_addresses.clone(),
            workers,
            // `run` sets it from the redirect backend it gets; `check`
            // shows what the rules (`--redirect auto`) would need.
            redirect_rules: true,
            proxy_port_mode: self.proxy_port_mode,
        }
    }
}

impl RunArgs {
    pub(super) fn options(&self) -> anyhow::Result<RunOptions> {
        let workers = match self.workers {
            Some(0) => anyhow::bail!("--workers must be at least 1"),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        if self.connect_timeouts.is_empty() || self.connect_timeouts.iter().any(Duration::is_zero) {
            anyhow::bail!("--connect-timeouts needs at least one non-zero duration");
        }
        ringport::compat::check_config(&self.source.config)?;
        if self.connect_timeouts.len() > MAX_ATTEMPTS {
            anyhow::bail!("--connect-timeouts allows at most {MAX_ATTEMPTS} attempts");
        }
        if self.udp_timeout.is_zero() || self.udp_max_flows == 0 {
            anyhow::bail!("--udp-timeout and --udp-max-flows must be non-zero");
        }
        if self.max_connections != 0 && self.max_connections < workers {
            anyhow::bail!(
                "--max-connections ({}) must be 0 or at least --workers ({workers})",
                self.max_connections
            );
        }
        if self.eject_backoff.is_zero() || self.eject_max < self.eject_backoff {
            anyhow::bail!("--eject-backoff must be non-zero and at most --eject-max");
        }
        let node_name = self.node_name.clone().or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_owned())
        });
        let source = match self.kube.kind {
            SourceKind::File => SourceChoice::File,
            SourceKind::Kube => SourceChoice::Kube(KubeOptions {
                kubeconfig: self.kube.kubeconfig.clone(),
                master: self.kube.master.clone(),
                service_proxy_name: self.kube.service_proxy_name.clone(),
            }),
        };
        let redirect = self.redirect.unwrap_or_else(|| source.default_redirect());
        if redirect == RedirectMode::None && self.listen.proxy_port_mode == ProxyPortMode::Shared {
            return Err(ringport::run::RunError::SharedWithoutRules.into());
        }
        Ok(RunOptions {
            config: self.source.config.clone(),
            listen: self.listen.options(workers),
            workers: WorkerConfig {
                workers,
                pin: !self.no_pin,
                relay: self.relay,
                connect_timeouts: self.connect_timeouts.clone(),
                drain_timeout: self.drain_timeout,
                udp_timeout: self.udp_timeout,
                udp_max_flows: self.udp_max_flows,
                tcp_idle_timeout: (!self.tcp_idle_timeout.is_zero()).then_some(self.tcp_idle_timeout),
                max_connections: (self.max_connections != 0).then_some(self.max_connections),
                fail_after_accepts: self.fail_worker_after_accepts,
                proxy_trusted: self.proxy_protocol_trusted_cidrs.iter().map(IpNet::trunc).collect(),
                ..WorkerConfig::default()
            },
            balance: BalanceOptions {
                scheduler: self.scheduler,
                locality: Locality { node_name, zone: self.zone.clone() },
            },
            health: HealthPolicy {
                failures: self.eject_after,
                base: self.eject_backoff,
                max: self.eject_max,
            },
            healthz_bind_address: self.healthz_bind_address,
            metrics_bind_address: self.metrics_bind_address,
            redirect,
            proxy_address: self.listen.proxy_address,
            proxy_address6: self.listen.proxy_address6,
            transparent: SourceOptions {
                transparent: self.transparent,
                ready: false,
                ready6: false,
                mark: self.transparent_mark,
                ..SourceOptions::default()
            },
            source,
            handover: match &self.handover_socket {
                Some(p) if p.as_os_str() == "none" => None,
                path => Some(HandoverOptions {
                    path: path
                        .clone()
                        .unwrap_or_else(|| ringport::handover::default_path(self.healthz_bind_address)),
                    timeout: self.handover_timeout,
                    wait_after: self.wait_after_handover,
                }),
            },
        })
    }
}
