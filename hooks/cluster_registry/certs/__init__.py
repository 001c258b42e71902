"""The webhook's TLS: a long-lived CA and a renewable serving certificate in a Secret, plus caBundle."""
