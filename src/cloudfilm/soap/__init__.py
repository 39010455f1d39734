"""The query WebService: exam lists and exam status for hospital systems that cannot do
FHIR, through an HTTP/JSON door and a SOAP 1.1 door, with parameters and results in an
AES-256-GCM envelope (see docs/webservice.md)."""
