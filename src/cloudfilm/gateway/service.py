"""The gateway's work: poll the PACS sources, retrieve what is queued, deliver it.

One loop (:meth:`Gateway.run`) does the three steps in turn; the Storage SCP receives on
pynetdicom's threads meanwhile. Every step starts from the durable queue and records its
outcome there, so the loop can stop at any instruction and start again.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from datetime import date, datetime, timedelta
from typing import Any

from pydicom.dataset import Dataset

from cloudfilm.clock import Clock
from cloudfilm.config import (
    DeliveryMethod,
    GatewaySource,
    RemoteAfter,
    RetrieveMethod,
    Settings,
)
from cloudfilm.errors import NotFound
from cloudfilm.gateway import wado, wado_uri
from cloudfilm.gateway.api import APIServer, TriggerError, TriggerRequest
from cloudfilm.gateway.bandwidth import throttle_for
from cloudfilm.gateway.compress import compress_for_upload
from cloudfilm.gateway.delivery import ArchiveClient, CStoreClient, DeliveryError, StowOutcome
from cloudfilm.gateway.drops import Drop, DropError, Incomplete, NotDicom, open_drop, parse
from cloudfilm.gateway.hl7_trigger import GatewayHL7Listener
from cloudfilm.gateway.messages import close_message_log, message, open_message_log
from cloudfilm.gateway.models import Step
from cloudfilm.gateway.pacs import PacsClient, PacsError, StorageSCP, spool_received
from cloudfilm.gateway.queue import FoundStudy, GatewayQueue, Job, Outgoing, Rejected
from cloudfilm.gateway.sendback import SendBack

logger = logging.getLogger(__name__)


class Gateway:
    """Queue, PACS clients, Storage SCP and archive client of one gateway process."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        archive: ArchiveClient | CStoreClient | None = None,
    ) -> None:
        self.settings = settings
        self.gw = settings.gateway
        self.queue = GatewayQueue(settings, clock=clock)
        self.message_log = open_message_log(self.gw.data_dir)
        self.throttle = throttle_for(self.gw.bandwidth_bytes_per_second)
        """The gateway's one bandwidth bucket (``gateway.bandwidth_bytes_per_second``)."""
        self.archive = archive or (
            CStoreClient(self.gw, throttle=self.throttle)
            if self.gw.delivery is DeliveryMethod.CSTORE
            else ArchiveClient(self.gw, throttle=self.throttle)
        )
        self.send_back = SendBack(
            self.queue,
            ArchiveClient(self.gw, throttle=self.throttle if self.gw.bandwidth_send_back else None),
        )
        """The way back: studies from the archive to hospital nodes."""
        self.scp = StorageSCP(self.gw, self.queue)
        self.api: APIServer | None = None
        self.hl7: GatewayHL7Listener | None = None
        self._next_poll: dict[str, float] = {}
        self._sizes: dict[str, dict[str, int]] = {}
        """Per file-drop source: path → size at the last listing (stability check)."""

    def start(self) -> None:
        """Recover interrupted steps, then listen for C-STORE."""
        recovered = self.queue.recover() + self.send_back.jobs.recover()
        if recovered:
            logger.info("gateway: %d interrupted step(s) put back in line", recovered)
        self.scp.start()

    def start_api(self) -> None:
        """Serve the status API (``gateway.http_port``; 0: off) on a thread of this process.

        Raises
        ------
        APIConfigError
            Not on loopback without ``gateway.api_token``, or the port is taken.
        """
        if self.gw.http_port == 0:
            return
        self.api = APIServer(self.queue, self.gw, trigger=self.trigger)
        self.api.start()

    def start_hl7(self) -> None:
        """Listen for HL7 triggers over MLLP (``gateway.hl7_port``; empty: off).

        Raises
        ------
        OSError
            The port cannot be bound.
        """
        if self.gw.hl7_port is None:
            return
        self.hl7 = GatewayHL7Listener(self.gw, lambda request: self.trigger(request, peer="hl7"))
        self.hl7.start()

    def close(self) -> None:
        if self.api is not None:
            self.api.stop()
        if self.hl7 is not None:
            self.hl7.stop()
        self.scp.stop()
        self.archive.close()
        self.send_back.archive.close()
        self.queue.close()
        close_message_log(self.gw.data_dir)

    def source(self, name: str) -> GatewaySource:
        try:
            return self.gw.sources[name]
        except KeyError:
            raise NotFound(
                f"no PACS source named {name!r}; add it under [gateway.sources.{name}]"
            ) from None

    # ----------------------------------------------------------------- discovery

    def poll(self, name: str, *, today: date | None = None) -> int:
        """One C-FIND poll of source ``name`` over its date window; how many studies are new.

        The window runs from ``window_days`` before the high-water mark (the last day a
        complete poll covered; ``since`` or today on the first poll) to today, so exams the
        PACS learns about late are still found; studies already queued are skipped.
        """
        source = self.source(name)
        if source.retrieve.drops_files:
            return self.poll_drop(name)
        today = today or datetime.now().astimezone().date()
        state = self.queue.source_state(name)
        mark = state.polled_through if state and state.polled_through else source.since
        start = _day(mark) if mark else today
        start = min(start, today) - timedelta(days=source.window_days)
        window = f"{start:%Y%m%d}-{today:%Y%m%d}"
        client = PacsClient(self.gw, source)
        new = 0
        try:
            modalities: list[str | None] = [*source.modalities] or [None]
            for modality in modalities:
                for found in client.find_studies(study_date=window, modality=modality):
                    new += self.queue.discover(name, found)
        except PacsError as exc:
            self.queue.polled(name, through=None, error=str(exc))
            logger.warning("gateway: poll of %s failed: %s", name, exc)
            return 0
        self.queue.polled(name, through=f"{today:%Y%m%d}")
        return new

    def poll_drop(self, name: str) -> int:
        """One listing of a file-drop source (FTP or local folder); how many studies are new.

        Files whose size is the same as at the previous listing are taken: read, checked,
        spooled, their study queued. An FTP source first removes the files already delivered
        (``ftp_after``).
        """
        source = self.source(name)
        try:
            drop = open_drop(self.gw, source)
        except DropError as exc:
            self.queue.polled(name, through=None, error=str(exc))
            logger.warning("gateway: poll of %s failed: %s", name, exc)
            return 0
        new = 0
        try:
            remote = source.retrieve.remote_drop
            if remote and source.ftp_after is not RemoteAfter.KEEP:
                for path in self.queue.remote_delivered(name):
                    try:
                        drop.remove(path)
                    except DropError as exc:  # left there; tried again at the next poll
                        logger.warning("gateway: %s: %s", name, exc)
                        continue
                    self.queue.remote_removed(name, path)
            listing = drop.listing()
            previous = self._sizes.get(name, {})
            self._sizes[name] = listing
            known = self.queue.remote_files(name) if remote else {}
            for path, size in sorted(listing.items()):
                if known.get(path) == size or size == 0 or previous.get(path) != size:
                    continue  # taken already, empty, or still being written
                new += self._take(name, drop, path, size)
        except (DropError, OSError) as exc:  # OSError: a local file that cannot be moved
            self.queue.polled(name, through=None, error=f"{type(exc).__name__}: {exc}")
            logger.warning("gateway: poll of %s failed: %s", name, exc)
            return new
        finally:
            drop.close()
        self.queue.polled(name, through=None)
        return new

    def _take(self, name: str, drop: Drop, path: str, size: int) -> int:
        """Take one stable file; 1 when its study is new to the queue."""
        remote = self.source(name).retrieve.remote_drop
        digest = hashlib.sha256(f"{name}\0{path}".encode()).hexdigest()[:32]
        partial = self.gw.data_dir / "incoming" / name / f"{digest}.part"
        try:
            data = drop.fetch(path, size, partial)
        except Incomplete as exc:
            logger.warning("gateway: %s: %s", name, exc)
            return 0
        except OSError as exc:
            logger.warning("gateway: %s: %s could not be read: %s", name, path, exc)
            return 0
        try:
            header = parse(data)
        except NotDicom as exc:
            reason = f"{path}: {exc}"
            message("FILE-REFUSED", direction="in", peer=name, file=path, size=size,
                    reason=str(exc))  # fmt: skip
            logger.warning("gateway: %s: refused %s", name, reason)
            if remote:
                self.queue.remote_taken(name, path, size, sop_instance_uid=None, error=reason)
            drop.refused(path, reason)
            partial.unlink(missing_ok=True)
            return 0
        study_uid, sop_uid = str(header.StudyInstanceUID), str(header.SOPInstanceUID)
        modality = str(header.get("Modality") or "") or None
        found = FoundStudy(
            study_instance_uid=study_uid,
            accession_number=str(header.get("AccessionNumber") or "") or None,
            study_date=str(header.get("StudyDate") or "") or None,
            modalities=modality,
        )
        new = self.queue.discover(name, found)
        if self.queue.accept(
            data,
            study_instance_uid=study_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=str(header.SOPClassUID),
        ):
            self.queue.arrived_late(study_uid)
        if remote:
            self.queue.remote_taken(name, path, size, sop_instance_uid=sop_uid)
        drop.taken(path)
        partial.unlink(missing_ok=True)
        message("FILE", direction="in", peer=name, file=path, size=size, study_uid=study_uid,
                sop_uid=sop_uid)  # fmt: skip
        return int(new)

    def fetch(
        self,
        name: str,
        *,
        study_instance_uid: str | None = None,
        accession_number: str | None = None,
        patient_id: str | None = None,
        study_date: str | None = None,
        now: bool = False,
    ) -> list[FoundStudy]:
        """A manual request: find the studies and queue them.

        A request for particular studies (UID, accession number, patient ID) is moved outside
        the schedule: someone is waiting for it. A back-fill by date range alone keeps to
        ``gateway.schedule_hours`` like the polls, unless ``now``.
        """
        if not (study_instance_uid or accession_number or patient_id or study_date):
            raise ValueError("name a study UID, an accession number, a patient ID or dates")
        source = self.source(name)
        if source.retrieve.drops_files:
            raise ValueError(
                f"source {name!r} is a {source.retrieve} drop: its files are taken as they "
                "come, there is no PACS to ask"
            )
        client = PacsClient(self.gw, source)
        found = client.find_studies(
            study_instance_uid=study_instance_uid,
            accession_number=accession_number,
            patient_id=patient_id,
            study_date=study_date,
        )
        urgent = now or bool(study_instance_uid or accession_number or patient_id)
        for study in found:
            self.queue.discover(name, study, manual=urgent)
        return found

    def trigger(self, request: TriggerRequest, *, peer: str = "http") -> dict[str, Any]:
        """ "Exam X is final" (``POST /trigger``, or an HL7 message on the MLLP trigger
        listener, ``peer="hl7"``): find the study in the PACS and queue it at
        once, outside the schedule and ahead of any back-off wait.

        With a Study Instance UID the study is queued even when the C-FIND fails or finds
        nothing yet (the images may reach the PACS after the report): retrieval then retries
        with back-off until they are there. An accession number alone must be found.

        Raises
        ------
        TriggerError
            No such source, not found (accession only), or the PACS unreachable
            (accession only).
        """
        pacs = [n for n, s in self.gw.sources.items() if not s.retrieve.drops_files]
        name = request.source or (pacs[0] if len(pacs) == 1 else None)
        if name is None or name not in pacs:
            raise TriggerError(
                400,
                f"name the PACS source ({', '.join(pacs) or 'none configured'})"
                if request.source is None
                else f"{request.source!r} is not a PACS source of this gateway",
            )
        study_uid, accession = request.study_instance_uid, request.accession_number
        note: str | None = None
        try:
            found = self.fetch(name, study_instance_uid=study_uid, accession_number=accession)
        except PacsError as exc:
            if not study_uid:
                raise TriggerError(502, f"the PACS could not be asked: {exc}") from exc
            found, note = [], f"C-FIND failed ({exc}); queued by its UID"
        if not found:
            if not study_uid:
                raise TriggerError(404, f"the PACS has no study with accession {accession}")
            self.queue.discover(
                name,
                FoundStudy(study_instance_uid=study_uid, accession_number=accession),
                manual=True,
            )
            found = [FoundStudy(study_instance_uid=study_uid, accession_number=accession)]
            note = note or "not in the PACS yet; retried with back-off until it is"
        for study in found:
            self.queue.expedite(study.study_instance_uid)
        message(
            "TRIGGER",
            direction="in",
            peer=peer,
            source=name,
            study_uids=[s.study_instance_uid for s in found],
            note=note,
        )
        queued = []
        for study in found:
            row = self.queue.study(study.study_instance_uid)
            queued.append(
                {
                    "study_instance_uid": study.study_instance_uid,
                    "expected": study.expected_instances,
                    "state": row.state if row else None,
                }
            )
        return {"source": name, "queued": queued, "note": note}

    # ----------------------------------------------------------------- retrieval

    def retrieve_next(self, *, in_schedule: bool = True) -> Job | None:
        job = self.queue.next_job(Step.RETRIEVE, in_schedule=in_schedule)
        if job is None:
            return None
        try:
            source = self.source(job.source)
        except NotFound as exc:
            self.queue.step_failed(job, str(exc))
            return job
        try:
            if source.retrieve.drops_files:
                # The files were read into the spool when the listing found them.
                self.queue.retrieved(job)
                return job
            if source.retrieve is RetrieveMethod.WADO:
                received = wado.retrieve_study(
                    self.gw, source, job.study_instance_uid, self._keep_wado
                )
                self.queue.retrieved(job, received_by_move=received or None)
                return job
            if source.retrieve is RetrieveMethod.WADO_URI:
                listed = wado_uri.retrieve_study(
                    self.gw,
                    source,
                    job.study_instance_uid,
                    self._keep_wado,
                    held=self.queue.held(job.study_id),
                )
                self.queue.retrieved(job, received_by_move=listed or None)
                return job
            client = PacsClient(self.gw, source)
            if source.retrieve is RetrieveMethod.GET:
                result = client.get_study(
                    job.study_instance_uid, lambda event: spool_received(self.queue, event)
                )
            else:
                result = client.move_study(job.study_instance_uid)
        except PacsError as exc:
            self.queue.step_failed(job, str(exc))
            return job
        except Exception as exc:  # a broken peer must not stop the loop
            logger.exception("gateway: %s of study #%d", source.retrieve, job.study_id)
            self.queue.step_failed(job, f"{type(exc).__name__}: {exc}")
            return job
        announced = result.completed + result.failed + result.warning
        if result.failed:
            self.queue.step_failed(
                job, f"the PACS failed {result.failed} of {announced} C-STORE sub-operations"
            )
            return job
        self.queue.retrieved(job, received_by_move=announced or None)
        return job

    def _keep_wado(self, data: bytes, header: Dataset) -> None:
        try:
            self.queue.accept(
                data,
                study_instance_uid=str(header.StudyInstanceUID),
                sop_instance_uid=str(header.SOPInstanceUID),
                sop_class_uid=str(header.SOPClassUID),
            )
        except Rejected as exc:  # the PACS answered with another study's object
            raise PacsError(f"WADO: {exc}") from exc

    # ----------------------------------------------------------------- delivery

    def deliver_next(self) -> Job | None:
        job = self.queue.next_job(Step.DELIVER)
        if job is None:
            return None
        try:
            outgoing = self.queue.outgoing(job)
            size = self.gw.batch_size
            for first in range(0, len(outgoing), size):
                self._send(job, outgoing[first : first + size])
        except DeliveryError as exc:
            self.queue.step_failed(job, str(exc))
            return job
        except Exception as exc:
            logger.exception("gateway: delivery of study #%d", job.study_id)
            self.queue.step_failed(job, f"{type(exc).__name__}: {exc}")
            return job
        self.queue.delivery_done(job)
        return job

    def _send(self, job: Job, batch: list[Outgoing]) -> None:
        by_uid = {item.sop_instance_uid: item for item in batch}
        parts = [(item.sop_instance_uid, self._outgoing_bytes(item)) for item in batch]
        outcome = self.archive.send(job.study_instance_uid, parts)
        self._record(outcome, by_uid)
        if outcome.anonymous_failures:
            # Some refusal names no instance: send the unmatched ones alone to learn which.
            named = set(outcome.delivered) | set(outcome.refused) | set(outcome.transient)
            for item in batch:
                if item.sop_instance_uid in named:
                    continue
                single = self.archive.send(
                    job.study_instance_uid, [(item.sop_instance_uid, self._outgoing_bytes(item))]
                )
                self._record(single, by_uid)

    def _outgoing_bytes(self, item: Outgoing) -> bytes:
        """The spooled object, losslessly compressed first when ``compress_before_upload``."""
        data = self.queue.spool.read(item.spool_key)
        return compress_for_upload(
            data, self.gw.compress_before_upload, sop_instance_uid=item.sop_instance_uid
        )

    def _record(self, outcome: StowOutcome, by_uid: dict[str, Outgoing]) -> None:
        self.queue.delivery_results(
            delivered=[by_uid[u].instance_id for u in outcome.delivered if u in by_uid],
            refused={by_uid[u].instance_id: r for u, r in outcome.refused.items() if u in by_uid},
            transient={
                by_uid[u].instance_id: r for u, r in outcome.transient.items() if u in by_uid
            },
        )

    # ----------------------------------------------------------------- the loop

    def in_schedule(self, now: datetime | None = None) -> bool:
        """Whether polled (not manual) studies may be moved now (``gateway.schedule_hours``)."""
        if self.gw.schedule_hours is None:
            return True
        start_text, _, end_text = self.gw.schedule_hours.partition("-")
        start, end = int(start_text), int(end_text)
        hour = (now or datetime.now().astimezone()).hour
        return start <= hour < end if start < end else hour >= start or hour < end

    def run_once(self) -> bool:
        """Poll the sources that are due, then one retrieval and one delivery; True when
        anything was done."""
        busy = False
        now = time.monotonic()
        for name, source in self.gw.sources.items():
            if now >= self._next_poll.get(name, 0.0):
                self._next_poll[name] = now + source.poll_interval
                busy |= self.poll(name) > 0
        busy |= self.retrieve_next(in_schedule=self.in_schedule()) is not None
        busy |= self.deliver_next() is not None
        busy |= self.send_back.run_next() is not None
        return busy

    def run(self, stop: threading.Event, *, idle_seconds: float = 0.5) -> None:
        """Work until ``stop`` is set; a step in progress finishes first."""
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception:
                logger.exception("gateway: loop iteration failed")
                busy = False
            if not busy:
                stop.wait(idle_seconds)


def _day(text: str) -> date:
    return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
