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

#[cfg(test)]
mod tests {
    use super::*;

    const P12: &[u8] = include_bytes!("../../../../salesforce-emulator/testdata/jwt-test-key.p12");

    #[test]
    fn the_keystore_key_signs_assertions_the_emulator_accepts() {
        let value = format!(
            "data:text/plain;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(P12)
        );
        let pem = private_key_pem(&value, "changeit").unwrap();
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
        let claims = serde_json::json!({"iss": "a", "sub": "b", "aud": "c", "exp": 4_000_000_000u64});
        let jwt = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &key,
        )
        .unwrap();
        let public = include_str!("../../../../salesforce-emulator/testdata/jwt-test-key.pub.pem");
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        v.set_audience(&["c"]);
        jsonwebtoken::decode::<serde_json::Value>(
            &jwt,
            &jsonwebtoken::DecodingKey::from_rsa_pem(public.as_bytes()).unwrap(),
            &v,
        )
        .unwrap();
        let wrong = private_key_pem(&value, "wrong").unwrap_err();
        assert!(wrong.contains("password"), "{wrong}");
        assert!(
            private_key_pem("data:text/plain;base64,!!", "x")
                .unwrap_err()
                .contains("base64")
        );
    }
}
