//! `epserve certs`: a development CA and per-component certificates for mutual TLS (issued by
//! `epserve_tls::dev`).

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// Directory to write the CA and the certificates into (created if missing; earlier files are
    /// replaced).
    #[arg(long, env = "EPSERVE_CERTS_OUT")]
    pub out: PathBuf,
    /// Host names and IP addresses the certificates are valid for, besides localhost, 127.0.0.1 and
    /// ::1: every address peers use to reach a component.
    #[arg(long, value_delimiter = ',', env = "EPSERVE_CERTS_HOSTS")]
    pub hosts: Vec<String>,
}

pub fn run(args: CertsArgs) -> Result<()> {
    let certs = epserve_tls::dev::issue(&args.out, &args.hosts)
        .with_context(|| format!("issuing development certificates into {}", args.out.display()))?;
    println!("CA: {} (its key: {})", certs.ca().display(), certs.dir.join(epserve_tls::dev::CA_KEY).display());
    for component in epserve_tls::dev::COMPONENTS {
        let files = certs.files(component);
        println!(
            "{component:<12} --tls-cert {} --tls-key {} --tls-ca {}",
            files.cert.display(),
            files.key.display(),
            files.ca.display()
        );
    }
    println!(
        "valid for {} days; development only: keep ca.key away from the cluster, and use your own PKI in production",
        epserve_tls::dev::VALIDITY_DAYS
    );
    Ok(())
}
