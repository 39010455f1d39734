"""The patient master index on SQLite and PostgreSQL: sealed identifiers, blind-index
lookup, demographics history, merge and unmerge with the studies following."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select, text

from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import Patient, Study
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.errors import Conflict, NotFound
from cloudfilm.mpi import service as mpi
from cloudfilm.mpi.keys import keys_for
from cloudfilm.mpi.models import Person, PersonIdentifier
from cloudfilm.mpi.service import Demographics, InvalidIdentifier, identifier

ID_CARD = "11010519491231002X"
PHONE = "13800138000"
ACTOR = Actor.cli("pytest")


def _patient_with_study(archive: Archive, patient_id: str, issuer: str, uid: str) -> None:
    now = datetime.now(UTC)
    with archive.db.session() as session:
        patient = Patient(
            patient_id=patient_id, issuer_of_patient_id=issuer, created_at=now, updated_at=now
        )
        session.add(patient)
        session.flush()
        session.add(
            Study(patient_pk=patient.id, study_instance_uid=uid, created_at=now, updated_at=now)
        )


def _register(archive: Archive, *idents: tuple[str, str, str], **demo: str) -> int:
    with archive.db.session() as session:
        person = mpi.register(
            session=session,
            identifiers=[identifier(*i) for i in idents],
            demographics=Demographics(**demo),
            source="test",
        )
        return person.id


def test_register__sealed_identifiers_never_in_clear(archive: Archive) -> None:
    person_id = _register(
        archive,
        ("PI", "HIS", "P001"),
        ("NNCHN", "", ID_CARD.lower()),
        ("PHONE", "", "+86 138 0013 8000"),
        name="张三丰",
        sex="M",
        birth_date="1949-12-31",
    )
    with archive.db.read_session() as session:
        # Every column of every identifier row, as the database holds it.
        dump = " ".join(
            str(v) for row in session.execute(text("SELECT * FROM mpi_identifier")) for v in row
        )
        assert ID_CARD not in dump and ID_CARD.lower() not in dump and PHONE not in dump
        assert "P001" in dump
        sealed = session.scalars(
            select(PersonIdentifier).where(PersonIdentifier.id_type == "NNCHN")
        ).one()
        keys = keys_for(archive.settings)
        assert sealed.value is None and sealed.key_id == keys.key_id
        assert sealed.value_sealed and sealed.value_sealed.startswith("v1.aesgcm.")
        assert keys.open(sealed.value_sealed) == ID_CARD
        assert sealed.blind_index == keys.blind_index("NNCHN", ID_CARD)
        # Exact lookup through the blind index, whatever the spelling.
        for spelling in (ID_CARD, ID_CARD.lower(), "110105 19491231 002x"):
            found = mpi.find(session=session, ident=identifier("NNCHN", "", spelling))
            assert found is not None and found.id == person_id
        by_phone = mpi.find(session=session, ident=identifier("PHONE", "", "138-0013-8000"))
        assert by_phone is not None and by_phone.id == person_id
        assert mpi.find(session=session, ident=identifier("PI", "OTHER", "P001")) is None
        person = session.get(Person, person_id)
        assert person is not None
        assert (person.name_pinyin, person.name_initials) == ("zhangsanfeng", "zsf")
        assert person.birth_date == "19491231"


def test_register__update_keeps_history_and_replaces_phones(archive: Archive) -> None:
    first = _register(archive, ("PI", "HIS", "P1"), ("PHONE", "", PHONE), name="王芳", sex="F")
    again = _register(
        archive, ("PI", "HIS", "P1"), ("MC", "HIS", "C9"), ("PHONE", "", "13900001111"),
        name="王小芳", address="北京市海淀区",
    )  # fmt: skip
    assert again == first
    # A family's one phone: a second person may hold it too.
    other = _register(archive, ("PI", "HIS", "P2"), ("PHONE", "", "13900001111"), name="王大明")
    assert other != first
    with archive.db.read_session() as session:
        person = mpi.get_person(session=session, person_id=first)
        created, change = mpi.history_of(session=session, person=person)
        assert created.after == {"name": "王芳", "sex": "F"}
        assert change.before == {"name": "王芳", "address": ""}
        assert change.after == {"name": "王小芳", "address": "北京市海淀区"}
        assert person.sex == "F"  # not in the update: unchanged
        kinds = sorted(r.id_type for r in mpi.identifiers_of(session=session, person=person))
        assert kinds == ["MC", "PHONE", "PI"]
        assert mpi.find(session=session, ident=identifier("PHONE", "", PHONE)) is None
    with pytest.raises(Conflict, match="合并"), archive.db.session() as session:
        mpi.register(
            session=session,
            identifiers=[identifier("PI", "HIS", "P1"), identifier("PI", "HIS", "P2")],
            demographics=Demographics(),
            source="test",
        )
    # Sex as GB/T 2261.1 codes or in Chinese, as some HIS send it.
    assert _register(archive, ("PI", "HIS", "P1"), sex="男") == first
    with archive.db.read_session() as session:
        assert mpi.get_person(session=session, person_id=first).sex == "M"
    latin = _register(archive, ("PI", "HIS", "P4"), name="MÜLLER^ANNA", sex="2")
    with archive.db.read_session() as session:
        found = mpi.pdq(session=session, query=mpi.DemographicQuery(pinyin="muller", sex="女"))
        assert [p.id for p in found] == [latin]
        assert mpi.get_person(session=session, person_id=latin).name_pinyin == "mulleranna"
    with pytest.raises(InvalidIdentifier, match="出生日期"), archive.db.session() as session:
        mpi.register(
            session=session, identifiers=[identifier("PI", "HIS", "P3")],
            demographics=Demographics(birth_date="19491340"), source="test",
        )  # fmt: skip


def test_merge_and_unmerge__studies_follow_the_identifiers(archive: Archive) -> None:
    survivor = _register(archive, ("PI", "HIS", "NEW1"), name="李小龙", birth_date="19401127")
    prior = _register(archive, ("PI", "HIS", "OLD1"), ("NNCHN", "", ID_CARD), name="李小龍")
    _patient_with_study(archive, "NEW1", "HIS", "1.2.3.1")
    _patient_with_study(archive, "OLD1", "", "1.2.3.2")  # no issuer: matches a PI
    with archive.db.session() as session:
        done = mpi.merge(
            session=session, survivor=identifier("PI", "HIS", "NEW1"),
            prior=identifier("PI", "HIS", "OLD1"), actor=ACTOR, source="test",
        )  # fmt: skip
        assert (done.survivor_id, done.prior_id) == (survivor, prior)
    with archive.db.session() as session:  # a resent A40 changes nothing
        again = mpi.merge(
            session=session, survivor=identifier("PI", "HIS", "NEW1"),
            prior=identifier("PI", "HIS", "OLD1"), actor=ACTOR, source="test",
        )  # fmt: skip
        assert again.id == done.id
    with archive.db.read_session() as session:
        person = mpi.find(session=session, ident=identifier("NNCHN", "", ID_CARD))
        assert person is not None and person.id == survivor
        uids = {s.study_instance_uid for s in mpi.studies_of(session=session, person=person)}
        assert uids == {"1.2.3.1", "1.2.3.2"}
        gone = mpi.get_person(session=session, person_id=prior)
        assert gone.merged_into == survivor
        assert mpi.studies_of(session=session, person=gone) != []  # resolves to the survivor
        found = mpi.pdq(session=session, query=mpi.DemographicQuery(pinyin="lixiaolong"))
        assert [p.id for p in found] == [survivor]  # the merged-away person is not listed
        owner = mpi.person_of_patient(session=session, patient_id="OLD1")
        assert owner is not None and owner.id == survivor
    with archive.db.session() as session:
        mpi.unmerge(session=session, prior_id=prior, actor=ACTOR, source="test")
    with archive.db.read_session() as session:
        back = mpi.find(session=session, ident=identifier("NNCHN", "", ID_CARD))
        assert back is not None and back.id == prior and back.merged_into is None
        kept = mpi.get_person(session=session, person_id=survivor)
        assert {s.study_instance_uid for s in mpi.studies_of(session=session, person=kept)} == {
            "1.2.3.1"
        }
        events = session.scalars(
            select(AuditEvent.event_type).where(AuditEvent.object_type == "mpi-person")
        ).all()
        assert sorted(events) == ["patient-merged", "patient-unmerged"]
    with pytest.raises(NotFound, match="未被合并"), archive.db.session() as session:
        mpi.unmerge(session=session, prior_id=prior, actor=ACTOR, source="test")


def test_merge__unknown_patient_is_a_clear_error(archive: Archive) -> None:
    _register(archive, ("PI", "HIS", "NEW2"), name="欧阳娜娜")
    with pytest.raises(NotFound, match="MRG-1"), archive.db.session() as session:
        mpi.merge(
            session=session, survivor=identifier("PI", "HIS", "NEW2"),
            prior=identifier("PI", "HIS", "NOBODY"), actor=ACTOR, source="test",
        )  # fmt: skip
    with pytest.raises(NotFound, match="保留的患者"), archive.db.session() as session:
        mpi.merge(
            session=session, survivor=identifier("PI", "HIS", "NOBODY"),
            prior=identifier("PI", "HIS", "NEW2"), actor=ACTOR, source="test",
        )  # fmt: skip
    with archive.db.read_session() as session:
        assert session.scalar(select(func.count()).select_from(Person)) == 1


def test_unmerge__chain_of_merges_undone_in_any_order(archive: Archive) -> None:
    a = _register(archive, ("PI", "HIS", "A"), name="甲")
    b = _register(archive, ("PI", "HIS", "B"), name="乙")
    c = _register(archive, ("PI", "HIS", "C"), name="丙")

    def merge(survivor: str, prior: str) -> None:
        with archive.db.session() as session:
            mpi.merge(
                session=session, survivor=identifier("PI", "HIS", survivor),
                prior=identifier("PI", "HIS", prior), actor=ACTOR, source="test",
            )  # fmt: skip

    def holder(value: str) -> int:
        with archive.db.read_session() as session:
            person = mpi.find(session=session, ident=identifier("PI", "HIS", value))
            assert person is not None
            return person.id

    merge("B", "A")  # A into B
    merge("C", "B")  # B (holding A's number) into C
    assert {holder("A"), holder("B"), holder("C")} == {c}
    with archive.db.session() as session:
        mpi.unmerge(session=session, prior_id=a, actor=ACTOR, source="test")
    assert (holder("A"), holder("B"), holder("C")) == (a, c, c)
    with archive.db.session() as session:
        mpi.unmerge(session=session, prior_id=b, actor=ACTOR, source="test")
    assert (holder("A"), holder("B"), holder("C")) == (a, b, c)
