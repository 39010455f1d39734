"""GB 11643-1999 ID-card numbers: check character, shape, birth date, normalisation."""

from __future__ import annotations

import pytest

from cloudfilm.mpi import idcard
from cloudfilm.mpi.service import ID_CARD, InvalidIdentifier, identifier, mask

# The standard's own example (GB 11643-1999 appendix) and numbers built with it.
VALID = ["11010519491231002X", "440524188001010014", "110101199003074477"]


@pytest.mark.parametrize("number", VALID)
def test_validate__accepts_numbers_with_the_right_check_character(number: str) -> None:
    assert idcard.validate(number) == number
    assert idcard.check_character(number[:17]) == number[17]


def test_validate__normalises_lower_case_x_spaces_and_full_width_digits() -> None:
    assert idcard.validate(" 110105 19491231 002x ") == "11010519491231002X"
    assert idcard.validate("１１０１０５１９４９１２３１００２Ｘ") == "11010519491231002X"


@pytest.mark.parametrize(
    ("number", "reason"),
    [
        ("110105194912310021", "校验位"),  # check character should be X
        ("11010519491231002", "18位"),  # 17 characters
        ("1101051949123100211", "18位"),  # 19 characters
        ("11010519491231X02X", "18位"),  # X inside
        ("01010519491231002X", "18位"),  # leading zero: no such division code
        ("110105194902300028", "出生日期"),  # 30 February
        ("110105290001010018", "出生日期"),  # born in the future
        ("", "18位"),
    ],
)
def test_validate__refuses_with_a_reason(number: str, reason: str) -> None:
    with pytest.raises(idcard.InvalidIdCard, match=reason):
        idcard.validate(number)
    assert not idcard.is_valid(number)


def test_birth_date_and_sex__read_from_the_number() -> None:
    assert idcard.birth_date("11010519491231002X") == "19491231"
    assert idcard.sex("11010519491231002X") == "F"  # 002: even
    assert idcard.sex("440524188001010014") == "M"  # 001: odd


def test_identifier__id_card_aliases_validated_and_masked() -> None:
    for alias in ("NNCHN", "ID", "NI", "sfz"):
        ident = identifier(alias, "", "11010519491231002x")
        assert (ident.id_type, ident.value, ident.sealed) == (ID_CARD, "11010519491231002X", True)
    with pytest.raises(InvalidIdentifier, match="校验位"):
        identifier("NNCHN", "", "110105194912310021")
    assert mask(ID_CARD, "11010519491231002X") == "110105********002X"
    assert mask("PHONE", "13800138000") == "138****8000"


def test_identifier__phone_normalised_and_hostile_values_refused() -> None:
    assert identifier("TEL", "", "+86 138-0013-8000").value == "13800138000"
    assert identifier("PHONE", "", "0086 13800138000").value == "13800138000"
    with pytest.raises(InvalidIdentifier, match="电话"):
        identifier("PHONE", "", "call me")
    with pytest.raises(InvalidIdentifier, match="控制字符"):
        identifier("PI", "HIS", "P1\x00; DROP TABLE")
    with pytest.raises(InvalidIdentifier, match="标识类型"):
        identifier("P I'--", "", "1")
    with pytest.raises(InvalidIdentifier, match="过长"):
        identifier("PI", "", "9" * 65)
