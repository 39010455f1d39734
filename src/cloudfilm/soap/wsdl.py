"""SOAP 1.1 for the query WebService: the WSDL, reading a request, writing an answer or
a Fault. Standard library only (``xml.etree``); document/literal, one element per field
of the envelope, so that any SOAP toolkit (CXF, .NET WCF, gSOAP, zeep) binds it.

Requests with a DTD are refused before parsing: the envelope never needs one, and this
closes entity expansion and external entities whatever the XML parser's defaults.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any
from xml.sax.saxutils import escape

from cloudfilm.soap.client import REQUEST_FIELDS

SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
NS = "urn:cloudfilm:webservice:1"
OPERATIONS = ("QueryExams", "GetExam")
_DTD = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


class SOAPError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_request(body: bytes, limit: int) -> tuple[str, dict[str, Any]]:
    """The operation name and the envelope fields of a SOAP request.

    Child elements other than the envelope's (plaintext parameters such as
    ``accession_number``) are kept, so that the caller refuses them as plaintext.
    """
    if len(body) > limit:
        raise SOAPError("malformed_envelope", f"SOAP 请求过大 · SOAP request over {limit} bytes")
    if _DTD.search(body):
        raise SOAPError("malformed_envelope", "不接受DTD · a DTD is not accepted in SOAP requests")
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        raise SOAPError("malformed_envelope", "不是有效的XML · not well-formed XML") from None
    if root.tag != f"{{{SOAP_NS}}}Envelope":
        raise SOAPError(
            "malformed_envelope",
            f"不是SOAP 1.1信封 · not a SOAP 1.1 Envelope (namespace {SOAP_NS})",
        )
    body_element = root.find(f"{{{SOAP_NS}}}Body")
    if body_element is None or len(body_element) != 1:
        raise SOAPError(
            "malformed_envelope", "SOAP Body 应含一个操作 · the Body holds one operation"
        )
    operation = body_element[0]
    name = operation.tag.removeprefix(f"{{{NS}}}")
    if name not in OPERATIONS or not operation.tag.startswith(f"{{{NS}}}"):
        raise SOAPError(
            "unknown_operation",
            f"未知操作 · unknown operation; this service has {', '.join(OPERATIONS)} in {NS}",
        )
    fields: dict[str, Any] = {}
    for child in operation:
        local = child.tag.rsplit("}", 1)[-1]
        fields[local] = (child.text or "").strip()
    return name, fields


def _envelope(inner: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<soap:Envelope xmlns:soap="{SOAP_NS}" xmlns:cf="{NS}">'
        f"<soap:Body>{inner}</soap:Body></soap:Envelope>"
    ).encode()


def response(operation: str, envelope: dict[str, Any]) -> bytes:
    fields = "".join(
        f"<cf:{name}>{escape(str(envelope[name]))}</cf:{name}>"
        for name in (*REQUEST_FIELDS, "reply_to")
    )
    return _envelope(f"<cf:{operation}Response>{fields}</cf:{operation}Response>")


def fault(code: str, message: str, *, server: bool = False) -> bytes:
    side = "soap:Server" if server else "soap:Client"
    return _envelope(
        f"<soap:Fault><faultcode>{side}</faultcode><faultstring>{escape(message)}</faultstring>"
        f"<detail><cf:error>{escape(code)}</cf:error></detail></soap:Fault>"
    )


def document(address: str) -> bytes:
    """The WSDL 1.1 of the SOAP door, with ``address`` as the service location."""
    messages = "".join(
        f'<wsdl:message name="{op}Request"><wsdl:part name="parameters" element="cf:{op}"/>'
        f"</wsdl:message>"
        f'<wsdl:message name="{op}Response"><wsdl:part name="parameters" '
        f'element="cf:{op}Response"/></wsdl:message>'
        for op in OPERATIONS
    )
    port_ops = "".join(
        f'<wsdl:operation name="{op}"><wsdl:input message="cf:{op}Request"/>'
        f'<wsdl:output message="cf:{op}Response"/></wsdl:operation>'
        for op in OPERATIONS
    )
    binding_ops = "".join(
        f'<wsdl:operation name="{op}"><soap:operation soapAction="{NS}#{op}" style="document"/>'
        '<wsdl:input><soap:body use="literal"/></wsdl:input>'
        '<wsdl:output><soap:body use="literal"/></wsdl:output></wsdl:operation>'
        for op in OPERATIONS
    )
    elements = "".join(
        f'<xs:element name="{op}" type="cf:RequestEnvelope"/>'
        f'<xs:element name="{op}Response" type="cf:ResponseEnvelope"/>'
        for op in OPERATIONS
    )
    request_fields = (
        '<xs:element name="client_id" type="xs:string"/>'
        '<xs:element name="key_id" type="xs:string"/>'
        '<xs:element name="timestamp" type="xs:long"/>'
        '<xs:element name="nonce" type="xs:string"/>'
        '<xs:element name="ciphertext" type="xs:string"/>'
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<wsdl:definitions name="CloudFilmQuery" '
        'xmlns:wsdl="http://schemas.xmlsoap.org/wsdl/" '
        'xmlns:soap="http://schemas.xmlsoap.org/wsdl/soap/" '
        'xmlns:xs="http://www.w3.org/2001/XMLSchema" '
        f'xmlns:cf="{NS}" targetNamespace="{NS}">'
        "<wsdl:documentation>云胶片检查查询服务 · Cloud Film exam query service. Parameters "
        "and results are AES-256-GCM envelopes (docs/webservice.md).</wsdl:documentation>"
        f'<wsdl:types><xs:schema targetNamespace="{NS}" elementFormDefault="qualified">'
        f'<xs:complexType name="RequestEnvelope"><xs:sequence>{request_fields}'
        "</xs:sequence></xs:complexType>"
        f'<xs:complexType name="ResponseEnvelope"><xs:sequence>{request_fields}'
        '<xs:element name="reply_to" type="xs:string"/></xs:sequence></xs:complexType>'
        f'{elements}<xs:element name="error" type="xs:string"/>'
        "</xs:schema></wsdl:types>"
        f"{messages}"
        f'<wsdl:portType name="CloudFilmQueryPortType">{port_ops}</wsdl:portType>'
        '<wsdl:binding name="CloudFilmQueryBinding" type="cf:CloudFilmQueryPortType">'
        '<soap:binding style="document" transport="http://schemas.xmlsoap.org/soap/http"/>'
        f"{binding_ops}</wsdl:binding>"
        '<wsdl:service name="CloudFilmQueryService">'
        '<wsdl:port name="CloudFilmQueryPort" binding="cf:CloudFilmQueryBinding">'
        f'<soap:address location="{escape(address, {chr(34): "&quot;"})}"/>'
        "</wsdl:port></wsdl:service></wsdl:definitions>"
    ).encode()
