"""The site link protocol shared by the gateway and the relay (see sitelink/README or docs)."""
