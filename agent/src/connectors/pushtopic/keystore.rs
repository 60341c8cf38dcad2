//! `salesforce.jwt.keystore.file`: a PKCS#12 keystore holding the private key that signs
//! JWT bearer assertions. As in the seed, the value is the keystore's bytes in base64 behind
//! a `data:text/plain;base64,` prefix (the seed also writes `data:text/plain:base64,`);
//! anything else is read as a file path. Parsed with the `p12-keystore` crate (pure Rust,
//! PBES2/AES and the legacy PBES1 ciphers Java's keytool writes).

use base64::Engine;

/// The keystore's private key as PKCS#8 PEM, for the JWT signer.
pub fn private_key_pem(value: &str, password: &str) -> Result<String, String> {
    let bytes = match value
        .strip_prefix("data:text/plain;base64,")
        .or_else(|| value.strip_prefix("data:text/plain:base64,"))
    {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| format!("the data: value is not base64 ({e})"))?,
        None => std::fs::read(value).map_err(|e| format!("cannot read the keystore file {value:?}: {e}"))?,
    };
    let store = p12_keystore::KeyStore::from_pkcs12(&bytes, password)
        .map_err(|e| format!("not a PKCS#12 keystore, or salesforce.jwt.keystore.password is wrong: {e}"))?;
    let (_, chain) = store
        .private_key_chain()
        .ok_or("the keystore holds no private key entry")?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(chain.key());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Ok(pem)
}
