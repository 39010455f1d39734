"""FHIR R4 REST edge under ``/fhir/R4``: read and search over what the archive holds
(Patient, ImagingStudy, AuditEvent), a CapabilityStatement, OperationOutcome errors."""
