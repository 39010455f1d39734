"""HL7 v2 intake over MLLP: the message store, the listener and the handler registry."""
